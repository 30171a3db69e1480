// Torch-side glue for the CUDA kernels: checks, allocation through the caching allocator, the current stream,
// and TORCH_LIBRARY_IMPL(hessian, CUDA). Compiled by the host compiler in a CUDAExtension build only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "hessian_kernels.h"

namespace hessian {
namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return hessian_cuda::kFloat32;
    case at::kDouble: return hessian_cuda::kFloat64;
    case at::kBFloat16: return hessian_cuda::kBFloat16;
    case at::kHalf: return hessian_cuda::kFloat16;
    default: TORCH_CHECK(false, "hessian CUDA ops: unsupported dtype ", t);
  }
  return -1;
}

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, what, ": ", cudaGetErrorString(e));
}

struct Lists {
  std::vector<void*> w, v, vp;
  std::vector<int64_t> numel;
  int dtype = -1;
};

Lists gather(at::TensorList w, at::TensorList v, const at::TensorList* vp, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(w.size() == v.size() && !w.empty(), "hessian: tensor lists must be non-empty and equally long");
  Lists L;
  L.dtype = dtype_code(w[0].scalar_type());
  for (size_t i = 0; i < w.size(); ++i) {
    TORCH_CHECK(w[i].is_cuda() && v[i].is_cuda(), "hessian CUDA op got a non-CUDA tensor");
    TORCH_CHECK(w[i].scalar_type() == w[0].scalar_type() && v[i].scalar_type() == w[0].scalar_type(),
                "hessian CUDA multi-tensor ops need one dtype across all tensors");
    TORCH_CHECK(w[i].numel() == v[i].numel(), "hessian: tensor ", i, " sizes differ");
    keep.push_back(w[i].contiguous());
    L.w.push_back(keep.back().data_ptr());
    TORCH_CHECK(v[i].is_contiguous(), "hessian: in-place vectors must be contiguous");
    L.v.push_back(v[i].data_ptr());
    if (vp) {
      TORCH_CHECK((*vp)[i].is_contiguous() && (*vp)[i].numel() == w[i].numel(), "hessian: bad v_prev tensor ", i);
      L.vp.push_back((*vp)[i].data_ptr());
    }
    L.numel.push_back(w[i].numel());
  }
  return L;
}

at::Tensor lanczos_step_cuda(at::TensorList w, at::TensorList v, at::TensorList vp, const at::Tensor& beta) {
  const c10::cuda::CUDAGuard guard(w[0].device());
  std::vector<at::Tensor> keep;
  Lists L = gather(w, v, &vp, keep);
  const int n = static_cast<int>(L.numel.size());
  at::Tensor ws = at::empty({static_cast<int64_t>(hessian_cuda::multi_tensor_workspace_bytes(n, L.numel.data()))},
                            w[0].options().dtype(at::kByte));
  at::Tensor b = beta.to(w[0].device(), at::kDouble).contiguous();
  at::Tensor out = at::empty({2}, w[0].options().dtype(at::kDouble));
  check_cuda(hessian_cuda::lanczos_step(L.dtype, n, L.w.data(), L.v.data(), L.vp.data(), L.numel.data(),
                                        b.data_ptr<double>(), out.data_ptr<double>(), ws.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream()),
             "lanczos_step");
  return out;
}

at::Tensor power_step_cuda(at::TensorList w, at::TensorList v) {
  const c10::cuda::CUDAGuard guard(w[0].device());
  std::vector<at::Tensor> keep;
  Lists L = gather(w, v, nullptr, keep);
  const int n = static_cast<int>(L.numel.size());
  at::Tensor ws = at::empty({static_cast<int64_t>(hessian_cuda::multi_tensor_workspace_bytes(n, L.numel.data()))},
                            w[0].options().dtype(at::kByte));
  at::Tensor out = at::empty({2}, w[0].options().dtype(at::kDouble));
  check_cuda(hessian_cuda::power_step(L.dtype, n, L.w.data(), L.v.data(), L.numel.data(), out.data_ptr<double>(),
                                      ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "power_step");
  return out;
}

at::Tensor shard_dot_cuda(at::TensorList w, at::TensorList v) {
  const c10::cuda::CUDAGuard guard(w[0].device());
  std::vector<at::Tensor> keep;
  Lists L = gather(w, v, nullptr, keep);
  const int n = static_cast<int>(L.numel.size());
  at::Tensor ws = at::empty({static_cast<int64_t>(hessian_cuda::multi_tensor_workspace_bytes(n, L.numel.data()))},
                            w[0].options().dtype(at::kByte));
  at::Tensor out = at::empty({2}, w[0].options().dtype(at::kDouble));
  check_cuda(hessian_cuda::shard_dot(L.dtype, n, L.w.data(), L.v.data(), L.numel.data(), out.data_ptr<double>(),
                                     ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "shard_dot");
  return out;
}

at::Tensor lanczos_update_cuda(at::TensorList w, at::TensorList v, at::TensorList vp, const at::Tensor& alpha,
                               const at::Tensor& beta) {
  const c10::cuda::CUDAGuard guard(w[0].device());
  std::vector<at::Tensor> keep;
  Lists L = gather(w, v, &vp, keep);
  const int n = static_cast<int>(L.numel.size());
  at::Tensor ws = at::empty({static_cast<int64_t>(hessian_cuda::multi_tensor_workspace_bytes(n, L.numel.data()))},
                            w[0].options().dtype(at::kByte));
  at::Tensor a = alpha.to(w[0].device(), at::kDouble).contiguous(), b = beta.to(w[0].device(), at::kDouble).contiguous();
  at::Tensor out = at::empty({1}, w[0].options().dtype(at::kDouble));
  check_cuda(hessian_cuda::lanczos_update(L.dtype, n, L.w.data(), L.v.data(), L.vp.data(), L.numel.data(),
                                          a.data_ptr<double>(), b.data_ptr<double>(), out.data_ptr<double>(),
                                          ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "lanczos_update");
  return out;
}

void check_rows(const at::Tensor& x, const at::Tensor& labels) {
  TORCH_CHECK(x.dim() == 2 && x.is_cuda(), "softmax_xent: expected a 2-D CUDA tensor");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong &&
                  labels.is_cuda(),
              "softmax_xent: labels must be int64 [rows] on the same device");
}

std::tuple<at::Tensor, at::Tensor> softmax_xent_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                     int64_t ignore_index) {
  check_rows(logits, labels);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor x = logits.contiguous(), y = labels.contiguous();
  at::Tensor probs = at::empty_like(x);
  at::Tensor loss = at::empty({x.size(0)}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  check_cuda(hessian_cuda::softmax_xent_forward(dtype_code(x.scalar_type()), x.data_ptr(), y.data_ptr<int64_t>(),
                                                x.size(0), x.size(1), ignore_index, loss.data_ptr(), probs.data_ptr(),
                                                c10::cuda::getCurrentCUDAStream()),
             "softmax_xent");
  return {loss, probs};
}

at::Tensor softmax_xent_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& probs, const at::Tensor& labels,
                                      int64_t ignore_index) {
  check_rows(probs, labels);
  const c10::cuda::CUDAGuard guard(probs.device());
  at::Tensor p = probs.contiguous(), y = labels.contiguous(), g = grad_loss.to(at::kDouble).contiguous();
  at::Tensor out = at::empty_like(p);
  check_cuda(hessian_cuda::softmax_xent_backward(dtype_code(p.scalar_type()), g.data_ptr<double>(), p.data_ptr(),
                                                 y.data_ptr<int64_t>(), p.size(0), p.size(1), ignore_index,
                                                 out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "softmax_xent_backward");
  return out;
}

std::tuple<at::Tensor, at::Tensor> softmax_xent_backward_backward_cuda(const at::Tensor& ggrad,
                                                                       const at::Tensor& grad_loss,
                                                                       const at::Tensor& probs,
                                                                       const at::Tensor& labels,
                                                                       int64_t ignore_index) {
  check_rows(probs, labels);
  const c10::cuda::CUDAGuard guard(probs.device());
  at::Tensor p = probs.contiguous(), y = labels.contiguous(), g = grad_loss.to(at::kDouble).contiguous();
  at::Tensor W = ggrad.to(p.scalar_type()).contiguous();
  at::Tensor gg = at::empty({p.size(0)}, p.options().dtype(at::kDouble));
  at::Tensor gp = at::empty_like(p);
  check_cuda(hessian_cuda::softmax_xent_backward_backward(
                 dtype_code(p.scalar_type()), W.data_ptr(), g.data_ptr<double>(), p.data_ptr(), y.data_ptr<int64_t>(),
                 p.size(0), p.size(1), ignore_index, gg.data_ptr<double>(), gp.data_ptr(),
                 c10::cuda::getCurrentCUDAStream()),
             "softmax_xent_backward_backward");
  return {gg.to(grad_loss.scalar_type()), gp};
}

at::Tensor softmax_backward_cuda(const at::Tensor& grad_probs, const at::Tensor& probs) {
  TORCH_CHECK(probs.dim() == 2 && probs.is_cuda() && grad_probs.sizes() == probs.sizes(),
              "softmax_backward: shape mismatch");
  const c10::cuda::CUDAGuard guard(probs.device());
  at::Tensor p = probs.contiguous(), G = grad_probs.to(p.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(p);
  check_cuda(hessian_cuda::softmax_backward(dtype_code(p.scalar_type()), G.data_ptr(), p.data_ptr(), p.size(0),
                                            p.size(1), out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
             "softmax_backward");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hessian, CUDA, m) {
  m.impl("lanczos_step", &lanczos_step_cuda);
  m.impl("power_step", &power_step_cuda);
  m.impl("shard_dot", &shard_dot_cuda);
  m.impl("lanczos_update", &lanczos_update_cuda);
  m.impl("softmax_xent", &softmax_xent_cuda);
  m.impl("softmax_xent_backward", &softmax_xent_backward_cuda);
  m.impl("softmax_xent_backward_backward", &softmax_xent_backward_backward_cuda);
  m.impl("softmax_backward", &softmax_backward_cuda);
}

}  // namespace hessian
