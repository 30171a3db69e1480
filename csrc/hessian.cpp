// The `hessian` operator library: schemas (TORCH_LIBRARY) and the whole-solve loops.
//
//   hessian::lanczos_step(w[], v[], v_prev[]!, beta) -> [alpha, beta_next]     (float64, fused multi-tensor)
//   hessian::power_step(w[], v[]!) -> [rayleigh, ||w||]                         (float64, fused multi-tensor)
//   hessian::softmax_xent(logits, labels, ignore_index) -> (loss_rows, probs)
//   hessian::softmax_xent_backward(grad_loss, probs, labels, ignore_index) -> grad_logits
//   hessian::softmax_xent_backward_backward(ggrad, grad_loss, probs, labels, ignore_index)
//        -> (grad_grad_loss, grad_probs)
//   hessian::softmax_backward(grad_probs, probs) -> grad_logits
//   hessian::lanczos_solve(grads[], params[], v0[], max_iter, tol) -> (alphas, betas, stop_code)
//   hessian::power_solve(grads[], params[], v0[], max_iter, tol) -> (history[k,2], stop_code)
//
// Device kernels live in csrc/cpu/hessian_cpu.cpp (always) and csrc/cuda/ (CUDA builds only). The solve
// loops are registered as CompositeImplicitAutograd: they run above autograd, call torch::autograd::grad on
// the caller's retained first-order graph for every Hessian-vector product and dispatch the fused step op,
// so a whole solve is a single call from Python. The autograd formulas of the cross-entropy ops are
// registered from Python (curvature.py, torch.library.register_autograd).
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <tuple>
#include <vector>

extern "C" {
// A Python module with no methods: importing it (setup.py build) loads the .so and runs the static
// TORCH_LIBRARY initialisers. The JIT build loads the same .so with torch.ops.load_library instead.
PyObject* PyInit_curvature_ext(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "curvature_ext", "hessian operator library", -1, nullptr};
  return PyModule_Create(&def);
}
}

namespace hessian {
namespace {

std::vector<at::Tensor> hvp(const std::vector<at::Tensor>& grads, const std::vector<int64_t>& idx,
                            const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& v) {
  std::vector<at::Tensor> gout;
  gout.reserve(idx.size());
  for (int64_t i : idx) gout.push_back(v[i]);
  auto res = torch::autograd::grad(grads, params, gout, /*retain_graph=*/true, /*create_graph=*/false,
                                   /*allow_unused=*/true);
  for (size_t i = 0; i < res.size(); ++i)
    if (!res[i].defined()) res[i] = at::zeros_like(params[i]);
    else if (!res[i].is_contiguous()) res[i] = res[i].contiguous();
  return res;
}

std::vector<at::Tensor> normalized_copy(at::TensorList v0) {
  std::vector<at::Tensor> v;
  at::Tensor sq = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(v0[0].device()));
  for (const auto& t : v0) sq = sq + t.detach().to(at::kDouble).pow(2).sum();
  const double nrm = std::sqrt(sq.item<double>());
  TORCH_CHECK(nrm > 0.0, "start vector is zero");
  for (const auto& t : v0) v.push_back((t.detach().to(at::kDouble) / nrm).to(t.scalar_type()).contiguous());
  return v;
}

// Ritz values of the k x k tridiagonal (alphas, off-diagonal betas[0..k-2]) and residual bounds
// |beta_k * s_last| of the two extreme Ritz pairs.
void ritz_extremes(const std::vector<double>& a, const std::vector<double>& b, double& lmin, double& lmax,
                   double& rmin, double& rmax) {
  const int64_t k = static_cast<int64_t>(a.size());
  at::Tensor T = at::zeros({k, k}, at::TensorOptions().dtype(at::kDouble));
  double* pt = T.data_ptr<double>();
  for (int64_t i = 0; i < k; ++i) {
    pt[i * k + i] = a[i];
    if (i + 1 < k) pt[i * k + i + 1] = pt[(i + 1) * k + i] = b[i];
  }
  auto [evals, evecs] = at::linalg_eigh(T, "L");
  const double* pe = evals.data_ptr<double>();
  at::Tensor S = evecs.contiguous();
  const double* ps = S.data_ptr<double>();
  lmin = pe[0];
  lmax = pe[k - 1];
  rmin = std::abs(b[k - 1] * ps[(k - 1) * k + 0]);
  rmax = std::abs(b[k - 1] * ps[(k - 1) * k + (k - 1)]);
}

}  // namespace

// Stop rules (stop_rule argument):
//   0 "both":     both extreme Ritz pairs have |beta_k s_k| <= tol * rho_k.
//   1 "dominant": the pair giving rho_k (the end of larger |theta|) has |beta_k s_k| <= tol * rho_k, and the
//                 other end is bounded away from it: |theta_o| + r_o <= (1 - margin) * rho_k (heuristic: the
//                 residual bound puts an eigenvalue within r_o of theta_o, not necessarily the extreme one).
// Stop codes: 0 = max_iter reached, 1 = residual bound met at both ends, 2 = invariant subspace (beta ~ 0),
//             3 = dominant end converged and the other end bounded (stop_rule 1).
// times[k] = seconds from the start of the call to the end of iteration k (HVP, step and stop test).
int64_t lanczos_stop_code(const std::vector<double>& alphas, const std::vector<double>& betas, double tol,
                          int64_t stop_rule, double margin) {
  double lmin, lmax, rmin, rmax;
  ritz_extremes(alphas, betas, lmin, lmax, rmin, rmax);
  const double scale = std::max(std::abs(lmin), std::abs(lmax));
  if (betas.back() <= 1e-12 * std::max(scale, 1e-300)) return 2;
  if (std::max(rmin, rmax) <= tol * scale) return 1;
  if (stop_rule == 1) {
    const bool max_dominant = std::abs(lmax) >= std::abs(lmin);
    const double rd = max_dominant ? rmax : rmin;
    const double other = max_dominant ? std::abs(lmin) + rmin : std::abs(lmax) + rmax;
    if (rd <= tol * scale && other <= (1.0 - margin) * scale) return 3;
  }
  return 0;
}

std::tuple<at::Tensor, at::Tensor, int64_t, at::Tensor> lanczos_solve(
    at::TensorList grads_, at::IntArrayRef grad_index, at::TensorList params_, at::TensorList v0, int64_t max_iter,
    double tol, int64_t stop_rule, double margin) {
  TORCH_CHECK(params_.size() == v0.size(), "lanczos_solve: params and v0 differ in length");
  TORCH_CHECK(grads_.size() == grad_index.size(), "lanczos_solve: grads and grad_index differ in length");
  TORCH_CHECK(stop_rule == 0 || stop_rule == 1, "lanczos_solve: stop_rule must be 0 (both) or 1 (dominant)");
  const auto t0 = std::chrono::steady_clock::now();
  static auto step = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hessian::lanczos_step", "")
                         .typed<at::Tensor(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&)>();
  std::vector<at::Tensor> grads(grads_.begin(), grads_.end()), params(params_.begin(), params_.end());
  std::vector<int64_t> idx(grad_index.begin(), grad_index.end());
  std::vector<at::Tensor> v = normalized_copy(v0), vp;
  for (const auto& t : v) vp.push_back(at::zeros_like(t));
  at::Tensor beta = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(v[0].device()));
  std::vector<double> alphas, betas, times;
  int64_t code = 0;
  for (int64_t it = 0; it < max_iter; ++it) {
    std::vector<at::Tensor> w = hvp(grads, idx, params, v);
    at::Tensor ab = step.call(w, v, vp, beta);
    w.clear();
    std::swap(v, vp);
    beta = ab.select(0, 1);
    at::Tensor abh = ab.cpu();
    alphas.push_back(abh.data_ptr<double>()[0]);
    betas.push_back(abh.data_ptr<double>()[1]);
    code = lanczos_stop_code(alphas, betas, tol, stop_rule, margin);
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (code) break;
  }
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  return {at::tensor(alphas, f64), at::tensor(betas, f64), code, at::tensor(times, f64)};
}

// eigenthings' rule: stop when |rq_k - rq_{k-1}| / |rq_k| < tol (rq_0 = 0). history[k] = (rq_k, ||H v_k||)
std::tuple<at::Tensor, int64_t, at::Tensor> power_solve(at::TensorList grads_, at::IntArrayRef grad_index,
                                                        at::TensorList params_, at::TensorList v0, int64_t max_iter,
                                                        double tol) {
  TORCH_CHECK(params_.size() == v0.size(), "power_solve: params and v0 differ in length");
  const auto t0 = std::chrono::steady_clock::now();
  static auto step = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hessian::power_step", "")
                         .typed<at::Tensor(at::TensorList, at::TensorList)>();
  std::vector<at::Tensor> grads(grads_.begin(), grads_.end()), params(params_.begin(), params_.end());
  std::vector<int64_t> idx(grad_index.begin(), grad_index.end());
  std::vector<at::Tensor> v = normalized_copy(v0);
  std::vector<double> hist, times;
  int64_t code = 0;
  double prev = 0.0;
  for (int64_t it = 0; it < max_iter; ++it) {
    std::vector<at::Tensor> w = hvp(grads, idx, params, v);
    at::Tensor r = step.call(w, v).cpu();
    const double rq = r.data_ptr<double>()[0];
    hist.push_back(rq);
    hist.push_back(r.data_ptr<double>()[1]);
    const double err = rq == 0.0 ? 1.0 : std::abs((rq - prev) / rq);
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (err < tol) { code = 1; break; }
    prev = rq;
  }
  at::Tensor h = at::tensor(hist, at::TensorOptions().dtype(at::kDouble)).view({-1, 2});
  return {h, code, at::tensor(times, at::TensorOptions().dtype(at::kDouble))};
}

TORCH_LIBRARY(hessian, m) {
  m.def("lanczos_step(Tensor[] w, Tensor[] v, Tensor(a!)[] v_prev, Tensor beta) -> Tensor");
  m.def("power_step(Tensor[] w, Tensor(a!)[] v) -> Tensor");
  m.def("softmax_xent(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  m.def("softmax_xent_backward(Tensor grad_loss, Tensor probs, Tensor labels, int ignore_index) -> Tensor");
  m.def(
      "softmax_xent_backward_backward(Tensor ggrad, Tensor grad_loss, Tensor probs, Tensor labels, "
      "int ignore_index) -> (Tensor, Tensor)");
  m.def("softmax_backward(Tensor grad_probs, Tensor probs) -> Tensor");
  m.def(
      "lanczos_solve(Tensor[] grads, int[] grad_index, Tensor[] params, Tensor[] v0, int max_iter, float tol, "
      "int stop_rule=1, float margin=0.05) -> (Tensor, Tensor, int, Tensor)");
  m.def(
      "power_solve(Tensor[] grads, int[] grad_index, Tensor[] params, Tensor[] v0, int max_iter, float tol) "
      "-> (Tensor, int, Tensor)");
}

TORCH_LIBRARY_IMPL(hessian, CompositeImplicitAutograd, m) {
  m.impl("lanczos_solve", &lanczos_solve);
  m.impl("power_solve", &power_solve);
}

}  // namespace hessian
