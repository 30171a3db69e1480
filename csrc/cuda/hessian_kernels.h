// Raw-pointer CUDA launchers of the `hessian` ops. No torch headers: hessian_kernels.cu compiles with nvcc
// alone (CI checks that on a CPU-only machine); csrc/cuda/hessian_cuda.cpp is the torch-side glue.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace hessian_cuda {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Bytes of device workspace the multi-tensor launchers need for n tensors of the given sizes.
size_t multi_tensor_workspace_bytes(int n_tensors, const int64_t* numel);

// Lanczos step over n tensors (all of dtype `dtype`): alpha = <w,v>; r = w - alpha v - beta v_prev;
// v_prev <- r / ||r||; out[0] = alpha, out[1] = ||r||  (float64, device memory). beta: device float64 scalar.
// workspace: device memory of multi_tensor_workspace_bytes(). No host synchronisation.
cudaError_t lanczos_step(int dtype, int n_tensors, void* const* w, void* const* v, void* const* v_prev,
                         const int64_t* numel, const double* beta, double* out, void* workspace,
                         cudaStream_t stream);

// Power step: out[0] = <w,v>, out[1] = ||w||, v <- w / ||w||.
cudaError_t power_step(int dtype, int n_tensors, void* const* w, void* const* v, const int64_t* numel, double* out,
                       void* workspace, cudaStream_t stream);

// The halves of lanczos_step for one shard (the caller all-reduces in between): out[0] = <w,v>,
// out[1] = <w,w>; lanczos_update: v_prev <- w - alpha v - beta v_prev, out[0] = ||v_prev||^2 (alpha, beta:
// device float64 scalars). workspace: multi_tensor_workspace_bytes().
cudaError_t shard_dot(int dtype, int n_tensors, void* const* w, void* const* v, const int64_t* numel, double* out,
                      void* workspace, cudaStream_t stream);
cudaError_t lanczos_update(int dtype, int n_tensors, void* const* w, void* const* v, void* const* v_prev,
                           const int64_t* numel, const double* alpha, const double* beta, double* out,
                           void* workspace, cudaStream_t stream);

// Softmax cross-entropy over rows of length V. loss: float (float64 when dtype is float64); probs: dtype.
cudaError_t softmax_xent_forward(int dtype, const void* logits, const int64_t* labels, int64_t rows, int64_t V,
                                 int64_t ignore_index, void* loss, void* probs, cudaStream_t stream);
// grad_logits = g_r * (p - onehot(y)); g: float64 per row.
cudaError_t softmax_xent_backward(int dtype, const double* g, const void* probs, const int64_t* labels, int64_t rows,
                                  int64_t V, int64_t ignore_index, void* grad_logits, cudaStream_t stream);
// gg_r = <W_r, p_r> - W_r[y_r] (float64); gp = g_r * W_r.
cudaError_t softmax_xent_backward_backward(int dtype, const void* W, const double* g, const void* probs,
                                           const int64_t* labels, int64_t rows, int64_t V, int64_t ignore_index,
                                           double* gg, void* gp, cudaStream_t stream);
// out = p * (G - <p, G>) row-wise.
cudaError_t softmax_backward(int dtype, const void* G, const void* probs, int64_t rows, int64_t V, void* out,
                             cudaStream_t stream);

}  // namespace hessian_cuda
