// CUDA kernels of the `hessian` ops: raw pointers and a cudaStream_t only (no torch headers), so this file
// compiles with nvcc on a machine without torch's CUDA build. Reductions accumulate in float64
// (atomicAdd(double*) needs sm_60 or newer); scalars stay in device memory, nothing synchronises the host.
#include "hessian_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace hessian_cuda {
namespace {

constexpr int64_t kChunk = 65536;
constexpr int kThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ double ld(const float* p, int64_t i) { return static_cast<double>(p[i]); }
__device__ __forceinline__ double ld(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double ld(const __nv_bfloat16* p, int64_t i) { return static_cast<double>(__bfloat162float(p[i])); }
__device__ __forceinline__ double ld(const __half* p, int64_t i) { return static_cast<double>(__half2float(p[i])); }

template <typename T> __device__ __forceinline__ T cvt(double x);
template <> __device__ __forceinline__ float cvt<float>(double x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ double cvt<double>(double x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16>(double x) { return __float2bfloat16(static_cast<float>(x)); }
template <> __device__ __forceinline__ __half cvt<__half>(double x) { return __float2half(static_cast<float>(x)); }

template <typename T> __device__ __forceinline__ double back(T x) { return ld(&x, 0); }

template <typename A>
__device__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}
template <typename A>
__device__ A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_down_sync(0xffffffffu, x, o));
  return x;
}
// block-wide reductions; result valid in every thread
template <typename A>
__device__ A block_sum(A x) {
  __shared__ A sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  x = warp_sum(x);
  if (lane == 0) sh[wid] = x;
  __syncthreads();
  A r = (threadIdx.x < (blockDim.x + 31) / 32) ? sh[threadIdx.x] : A(0);
  if (wid == 0) r = warp_sum(r);
  if (threadIdx.x == 0) sh[0] = r;
  __syncthreads();
  r = sh[0];
  __syncthreads();
  return r;
}
template <typename A>
__device__ A block_max(A x) {
  __shared__ A sh[32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  x = warp_max(x);
  if (lane == 0) sh[wid] = x;
  __syncthreads();
  A r = (threadIdx.x < (blockDim.x + 31) / 32) ? sh[threadIdx.x] : sh[0];
  if (wid == 0) r = warp_max(r);
  if (threadIdx.x == 0) sh[0] = r;
  __syncthreads();
  r = sh[0];
  __syncthreads();
  return r;
}

struct Table {
  void* const* w;
  void* const* v;
  void* const* vp;
  const int64_t* numel;
  const int* chunk_tensor;
  const int64_t* chunk_start;
  int n_chunks;
};

// mode 0: acc[0] += <w,v>;  mode 1: also acc[1] += <w,w>
template <typename T>
__global__ void dot_kernel(Table t, double* acc, int mode) {
  double s0 = 0.0, s1 = 0.0;
  for (int c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const int ti = t.chunk_tensor[c];
    const int64_t start = t.chunk_start[c];
    const int64_t end = min(start + kChunk, t.numel[ti]);
    const T* w = static_cast<const T*>(t.w[ti]);
    const T* v = static_cast<const T*>(t.v[ti]);
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      const double a = ld(w, i);
      s0 += a * ld(v, i);
      s1 += a * a;
    }
  }
  s0 = block_sum(s0);
  if (mode) s1 = block_sum(s1);
  if (threadIdx.x == 0) {
    atomicAdd(acc, s0);
    if (mode) atomicAdd(acc + 1, s1);
  }
}

template <typename T>
__global__ void lanczos_update_kernel(Table t, const double* alpha_p, const double* beta_p, double* acc_sq) {
  const double alpha = *alpha_p, beta = *beta_p;
  double s = 0.0;
  for (int c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const int ti = t.chunk_tensor[c];
    const int64_t start = t.chunk_start[c];
    const int64_t end = min(start + kChunk, t.numel[ti]);
    const T* w = static_cast<const T*>(t.w[ti]);
    const T* v = static_cast<const T*>(t.v[ti]);
    T* vp = static_cast<T*>(t.vp[ti]);
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      const T r = cvt<T>(ld(w, i) - alpha * ld(v, i) - beta * ld(vp, i));
      vp[i] = r;
      const double rd = back(r);
      s += rd * rd;
    }
  }
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(acc_sq, s);
}

// dst[i] = src[i] / *nrm (0 when the norm is 0); use_w selects src = w (power) or src = vp (Lanczos)
template <typename T>
__global__ void scale_kernel(Table t, int power, const double* nrm_p) {
  const double nrm = *nrm_p;
  const double inv = nrm > 0.0 ? 1.0 / nrm : 0.0;
  for (int c = blockIdx.x; c < t.n_chunks; c += gridDim.x) {
    const int ti = t.chunk_tensor[c];
    const int64_t start = t.chunk_start[c];
    const int64_t end = min(start + kChunk, t.numel[ti]);
    const T* src = static_cast<const T*>(power ? t.w[ti] : t.vp[ti]);
    T* dst = static_cast<T*>(power ? t.v[ti] : t.vp[ti]);
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) dst[i] = cvt<T>(ld(src, i) * inv);
  }
}

__global__ void finalize_kernel(const double* acc, double* out, int sqrt_second) {
  out[0] = acc[0];
  out[1] = sqrt_second ? sqrt(acc[1]) : acc[1];
}

// workspace layout: [3n pointers][n numel][n_chunks int][n_chunks int64][2 doubles acc]
struct Layout {
  size_t ptrs, numel, ctensor, cstart, acc, total;
  int n_chunks;
};
Layout layout(int n, const int64_t* numel) {
  Layout L{};
  int64_t chunks = 0;
  for (int i = 0; i < n; ++i) chunks += (numel[i] + kChunk - 1) / kChunk;
  L.n_chunks = static_cast<int>(chunks);
  auto align = [](size_t x) { return (x + 15) / 16 * 16; };
  L.ptrs = 0;
  L.numel = align(L.ptrs + 3 * n * sizeof(void*));
  L.ctensor = align(L.numel + n * sizeof(int64_t));
  L.cstart = align(L.ctensor + chunks * sizeof(int));
  L.acc = align(L.cstart + chunks * sizeof(int64_t));
  L.total = align(L.acc + 2 * sizeof(double));
  return L;
}

cudaError_t upload(int n, void* const* w, void* const* v, void* const* vp, const int64_t* numel, void* ws,
                   const Layout& L, Table& t, cudaStream_t stream) {
  std::vector<char> host(L.acc, 0);
  void** P = reinterpret_cast<void**>(host.data() + L.ptrs);
  for (int i = 0; i < n; ++i) {
    P[i] = w[i];
    P[n + i] = v[i];
    P[2 * n + i] = vp ? vp[i] : nullptr;
  }
  std::memcpy(host.data() + L.numel, numel, n * sizeof(int64_t));
  int* ct = reinterpret_cast<int*>(host.data() + L.ctensor);
  int64_t* cs = reinterpret_cast<int64_t*>(host.data() + L.cstart);
  int k = 0;
  for (int i = 0; i < n; ++i)
    for (int64_t s = 0; s < numel[i]; s += kChunk, ++k) {
      ct[k] = i;
      cs[k] = s;
    }
  char* d = static_cast<char*>(ws);
  t.w = reinterpret_cast<void* const*>(d + L.ptrs);
  t.v = t.w + n;
  t.vp = t.w + 2 * n;
  t.numel = reinterpret_cast<const int64_t*>(d + L.numel);
  t.chunk_tensor = reinterpret_cast<const int*>(d + L.ctensor);
  t.chunk_start = reinterpret_cast<const int64_t*>(d + L.cstart);
  t.n_chunks = L.n_chunks;
  cudaError_t e = cudaMemcpyAsync(d, host.data(), host.size(), cudaMemcpyHostToDevice, stream);
  if (e != cudaSuccess) return e;
  return cudaMemsetAsync(d + L.acc, 0, 2 * sizeof(double), stream);
}

int grid_for(int n_chunks) { return n_chunks < 1 ? 1 : (n_chunks < 4096 ? n_chunks : 4096); }

template <typename T>
void lanczos_launch(const Table& t, double* acc, const double* beta, double* out, cudaStream_t s) {
  const int g = grid_for(t.n_chunks);
  dot_kernel<T><<<g, kThreads, 0, s>>>(t, acc, 0);
  lanczos_update_kernel<T><<<g, kThreads, 0, s>>>(t, acc, beta, acc + 1);
  finalize_kernel<<<1, 1, 0, s>>>(acc, out, 1);
  scale_kernel<T><<<g, kThreads, 0, s>>>(t, 0, out + 1);
}

template <typename T>
void power_launch(const Table& t, double* acc, double* out, cudaStream_t s) {
  const int g = grid_for(t.n_chunks);
  dot_kernel<T><<<g, kThreads, 0, s>>>(t, acc, 1);
  finalize_kernel<<<1, 1, 0, s>>>(acc, out, 1);
  scale_kernel<T><<<g, kThreads, 0, s>>>(t, 1, out + 1);
}

// ---------------------------------------------------------------------------------------- cross-entropy
template <typename T>
__global__ void xent_fwd_kernel(const T* x, const int64_t* labels, int64_t V, int64_t ignore, void* loss, T* probs) {
  using A = typename Acc<T>::type;
  const int64_t r = blockIdx.x;
  const T* xr = x + r * V;
  T* pr = probs + r * V;
  const int64_t y = labels[r];
  if (y == ignore) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) pr[j] = cvt<T>(0.0);
    if (threadIdx.x == 0) {
      if (sizeof(T) == 8) static_cast<double*>(loss)[r] = 0.0;
      else static_cast<float*>(loss)[r] = 0.f;
    }
    return;
  }
  A m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) m = max(m, static_cast<A>(ld(xr, j)));
  m = block_max(m);
  double s = 0.0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += static_cast<double>(exp(static_cast<A>(ld(xr, j)) - m));
  s = block_sum(s);
  const A inv = static_cast<A>(1.0 / s);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) pr[j] = cvt<T>(exp(static_cast<A>(ld(xr, j)) - m) * inv);
  if (threadIdx.x == 0) {
    const double l = static_cast<double>(m) + log(s) - ld(xr, y);
    if (sizeof(T) == 8) static_cast<double*>(loss)[r] = l;
    else static_cast<float*>(loss)[r] = static_cast<float>(l);
  }
}

template <typename T>
__global__ void xent_bwd_kernel(const double* g, const T* p, const int64_t* labels, int64_t V, int64_t ignore, T* out) {
  const int64_t r = blockIdx.x;
  const int64_t y = labels[r];
  const double gr = y == ignore ? 0.0 : g[r];
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
    out[r * V + j] = cvt<T>(y == ignore ? 0.0 : gr * (ld(p + r * V, j) - (j == y ? 1.0 : 0.0)));
}

template <typename T>
__global__ void xent_bwd_bwd_kernel(const T* W, const double* g, const T* p, const int64_t* labels, int64_t V,
                                    int64_t ignore, double* gg, T* gp) {
  const int64_t r = blockIdx.x;
  const int64_t y = labels[r];
  const T* wr = W + r * V;
  const T* prow = p + r * V;
  if (y == ignore) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) gp[r * V + j] = cvt<T>(0.0);
    if (threadIdx.x == 0) gg[r] = 0.0;
    return;
  }
  const double gr = g[r];
  double d = 0.0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const double wj = ld(wr, j);
    d += wj * ld(prow, j);
    gp[r * V + j] = cvt<T>(gr * wj);
  }
  d = block_sum(d);
  if (threadIdx.x == 0) gg[r] = d - ld(wr, y);
}

template <typename T>
__global__ void softmax_bwd_kernel(const T* G, const T* p, int64_t V, T* out) {
  const int64_t r = blockIdx.x;
  double d = 0.0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) d += ld(G + r * V, j) * ld(p + r * V, j);
  d = block_sum(d);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
    out[r * V + j] = cvt<T>(ld(p + r * V, j) * (ld(G + r * V, j) - d));
}

#define HESSIAN_DISPATCH(dtype, ...)                          \
  switch (dtype) {                                            \
    case kFloat32: { using T = float; __VA_ARGS__; break; }   \
    case kFloat64: { using T = double; __VA_ARGS__; break; }  \
    case kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    case kFloat16: { using T = __half; __VA_ARGS__; break; }  \
    default: return cudaErrorInvalidValue;                    \
  }

}  // namespace

size_t multi_tensor_workspace_bytes(int n_tensors, const int64_t* numel) { return layout(n_tensors, numel).total; }

cudaError_t lanczos_step(int dtype, int n, void* const* w, void* const* v, void* const* vp, const int64_t* numel,
                         const double* beta, double* out, void* ws, cudaStream_t stream) {
  const Layout L = layout(n, numel);
  Table t;
  cudaError_t e = upload(n, w, v, vp, numel, ws, L, t, stream);
  if (e != cudaSuccess) return e;
  double* acc = reinterpret_cast<double*>(static_cast<char*>(ws) + L.acc);
  HESSIAN_DISPATCH(dtype, lanczos_launch<T>(t, acc, beta, out, stream));
  return cudaGetLastError();
}

cudaError_t power_step(int dtype, int n, void* const* w, void* const* v, const int64_t* numel, double* out, void* ws,
                       cudaStream_t stream) {
  const Layout L = layout(n, numel);
  Table t;
  cudaError_t e = upload(n, w, v, nullptr, numel, ws, L, t, stream);
  if (e != cudaSuccess) return e;
  double* acc = reinterpret_cast<double*>(static_cast<char*>(ws) + L.acc);
  HESSIAN_DISPATCH(dtype, power_launch<T>(t, acc, out, stream));
  return cudaGetLastError();
}

cudaError_t shard_dot(int dtype, int n, void* const* w, void* const* v, const int64_t* numel, double* out, void* ws,
                      cudaStream_t stream) {
  const Layout L = layout(n, numel);
  Table t;
  cudaError_t e = upload(n, w, v, nullptr, numel, ws, L, t, stream);
  if (e != cudaSuccess) return e;
  double* acc = reinterpret_cast<double*>(static_cast<char*>(ws) + L.acc);
  const int g = grid_for(t.n_chunks);
  HESSIAN_DISPATCH(dtype, (dot_kernel<T><<<g, kThreads, 0, stream>>>(t, acc, 1)));
  finalize_kernel<<<1, 1, 0, stream>>>(acc, out, 0);
  return cudaGetLastError();
}

cudaError_t lanczos_update(int dtype, int n, void* const* w, void* const* v, void* const* vp, const int64_t* numel,
                           const double* alpha, const double* beta, double* out, void* ws, cudaStream_t stream) {
  const Layout L = layout(n, numel);
  Table t;
  cudaError_t e = upload(n, w, v, vp, numel, ws, L, t, stream);
  if (e != cudaSuccess) return e;
  e = cudaMemsetAsync(out, 0, sizeof(double), stream);
  if (e != cudaSuccess) return e;
  const int g = grid_for(t.n_chunks);
  HESSIAN_DISPATCH(dtype, (lanczos_update_kernel<T><<<g, kThreads, 0, stream>>>(t, alpha, beta, out)));
  return cudaGetLastError();
}

cudaError_t softmax_xent_forward(int dtype, const void* logits, const int64_t* labels, int64_t rows, int64_t V,
                                 int64_t ignore_index, void* loss, void* probs, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  HESSIAN_DISPATCH(dtype, (xent_fwd_kernel<T><<<rows, kThreads, 0, stream>>>(
                              static_cast<const T*>(logits), labels, V, ignore_index, loss, static_cast<T*>(probs))));
  return cudaGetLastError();
}

cudaError_t softmax_xent_backward(int dtype, const double* g, const void* probs, const int64_t* labels, int64_t rows,
                                  int64_t V, int64_t ignore_index, void* grad_logits, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  HESSIAN_DISPATCH(dtype, (xent_bwd_kernel<T><<<rows, kThreads, 0, stream>>>(
                              g, static_cast<const T*>(probs), labels, V, ignore_index, static_cast<T*>(grad_logits))));
  return cudaGetLastError();
}

cudaError_t softmax_xent_backward_backward(int dtype, const void* W, const double* g, const void* probs,
                                           const int64_t* labels, int64_t rows, int64_t V, int64_t ignore_index,
                                           double* gg, void* gp, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  HESSIAN_DISPATCH(dtype, (xent_bwd_bwd_kernel<T><<<rows, kThreads, 0, stream>>>(
                              static_cast<const T*>(W), g, static_cast<const T*>(probs), labels, V, ignore_index, gg,
                              static_cast<T*>(gp))));
  return cudaGetLastError();
}

cudaError_t softmax_backward(int dtype, const void* G, const void* probs, int64_t rows, int64_t V, void* out,
                             cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  HESSIAN_DISPATCH(dtype, (softmax_bwd_kernel<T><<<rows, kThreads, 0, stream>>>(
                              static_cast<const T*>(G), static_cast<const T*>(probs), V, static_cast<T*>(out))));
  return cudaGetLastError();
}

}  // namespace hessian_cuda
