// The `hessian` operator library: schemas (TORCH_LIBRARY) and the whole-solve loops.
//
//   hessian::lanczos_step(w[], v[], v_prev[]!, beta) -> [alpha, beta_next]     (float64, fused multi-tensor)
//   hessian::power_step(w[], v[]!) -> [rayleigh, ||w||]                         (float64, fused multi-tensor)
//   hessian::shard_dot(w[], v[]) -> [<w,v>, <w,w>]                              (float64, one local shard)
//   hessian::lanczos_update(w[], v[], v_prev[]!, alpha, beta) -> [||r||^2]       (r into v_prev, not scaled)
//        the two halves of lanczos_step for a vector sharded across processes: the caller all-reduces
//        the float64 scalars between them (curvature.py, ShardedSpace)
//   hessian::softmax_xent(logits, labels, ignore_index) -> (loss_rows, probs)
//   hessian::softmax_xent_backward(grad_loss, probs, labels, ignore_index) -> grad_logits
//   hessian::softmax_xent_backward_backward(ggrad, grad_loss, probs, labels, ignore_index)
//        -> (grad_grad_loss, grad_probs)
//   hessian::softmax_backward(grad_probs, probs) -> grad_logits
//   hessian::softmax_backward_backward(ggrad, grad_probs, probs) -> (grad_grad_probs, grad_probs_of_probs)
//        the backward of softmax's backward along the last dim, one pass per row (attention_hvp.py; CPU only)
//   hessian::multi_dot(a[], b[]) -> <a, b>                                      (float64; CPU only)
//   hessian::rms_norm_backward(grad_y, x, w, rstd) -> (grad_x, grad_w)
//   hessian::rms_norm_backward_backward(gg_x, gg_w, grad_y, x, w, rstd) -> (grad_grad_y, grad_x, grad_w)
//   hessian::swiglu_backward(grad_h, a, b, s) -> (grad_a, grad_b)          (h = silu(a) b, s = sigmoid(a))
//   hessian::swiglu_backward_backward(gg_a, gg_b, grad_h, a, b, s) -> (grad_grad_h, grad_a, grad_b)
//   hessian::rotary(x, cos, sin, adjoint) -> R x or R^T x          (the rotary embedding, cos/sin broadcast)
//        RMSNorm's and the SwiGLU gate's backward and its backward, one pass or two per row; the rotation
//        (fused_layers.py; CPU only)
//   hessian::linear_xent(hidden, weight, labels, ignore_index, chunk_rows) -> (loss_rows, probs)
//   hessian::linear_xent_backward(grad_loss, hidden, weight, probs, labels, ...) -> (grad_hidden, grad_weight)
//   hessian::linear_xent_hvp(u?, U?, grad_loss, hidden, weight, probs, labels, ...)
//        -> (grad_grad_loss, grad_hidden, grad_weight)
//   hessian::lanczos_solve(grads[], grad_index, params[], v0[], max_iter, tol, stop_rule, margin)
//        -> (alphas, betas, stop_code, times)
//   hessian::power_solve(grads[], grad_index, params[], v0[], max_iter, tol) -> (history[k,2], stop_code, times)
//
// Device kernels live in csrc/cpu/hessian_cpu.cpp (always) and csrc/cuda/ (CUDA builds only); the linear_xent
// ops are composite ATen code (CompositeExplicitAutograd) here, so they run on either device. The solve
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

// Certified error bounds of the two extreme Ritz values of the k x k tridiagonal T_k (alphas, off-diagonal
// betas[0..k-2], beta_k = betas[k-1]); the rule of curvature.py's ritz_bounds(), kept in step with it.
// For a Ritz pair (theta_i, s_i) the residual r_i = |beta_k s_i[k-1]| puts an eigenvalue within r_i of
// theta_i; where the rest of the spectrum is known to stay gap_i = min_{j != i} |theta_i - theta_j| - r_j > r_i
// away, that eigenvalue is within r_i^2 / gap_i (Parlett, The Symmetric Eigenvalue Problem, 11.7). The gap is
// known only once the next Ritz value n of the same end is resolved: k >= 3 and r_n < |theta_i - theta_n| / 2
// (with k = 2 the other Ritz value mixes the rest of the spectrum and can hide a close second eigenvalue),
// and r_i^2 / gap_i is trusted no further than theta_i's change over the last step (an end still moving by
// more has not met the eigenvalue the gap assumes): bound_i = min(r_i, max(r_i^2 / gap_i, |theta_i - prev_i|)).
struct Extremes {
  double lmin, lmax, rmin, rmax, bmin, bmax;
};

Extremes ritz_bounds(const std::vector<double>& a, const std::vector<double>& b) {
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
  std::vector<double> r(k);
  for (int64_t i = 0; i < k; ++i) r[i] = std::abs(b[k - 1] * ps[(k - 1) * k + i]);
  auto bound = [&](int64_t i, int64_t n) {
    if (k < 3 || !(r[n] < 0.5 * std::abs(pe[i] - pe[n]))) return r[i];
    double gap = INFINITY;
    for (int64_t j = 0; j < k; ++j)
      if (j != i) gap = std::min(gap, std::abs(pe[i] - pe[j]) - r[j]);
    if (!(gap > r[i] && std::isfinite(gap))) return r[i];
    at::Tensor prev = at::linalg_eigvalsh(T.slice(0, 0, k - 1).slice(1, 0, k - 1), "L");
    const double moved = std::abs(pe[i] - prev.data_ptr<double>()[i == 0 ? 0 : k - 2]);
    return std::min(r[i], std::max(r[i] * r[i] / gap, moved));
  };
  return {pe[0], pe[k - 1], r[0], r[k - 1], bound(0, 1), bound(k - 1, k - 2)};
}

}  // namespace

// Stop rules (stop_rule argument), with tol the relative tolerance on the eigenvalue (curvature.py's rtol):
//   0 "both":     both extreme Ritz values have a certified bound (see ritz_bounds) <= tol * rho_k.
//   1 "dominant": the end giving rho_k has bound <= tol * rho_k, and the other end is bounded away from it:
//                 |theta_o| + r_o <= (1 - margin) * rho_k (heuristic: the residual bound puts an eigenvalue
//                 within r_o of theta_o, not necessarily the extreme one).
// Stop codes: 0 = max_iter reached, 1 = both ends certified, 2 = invariant subspace (beta ~ 0),
//             3 = dominant end certified and the other end bounded (stop_rule 1).
// times[k] = seconds from the start of the call to the end of iteration k (HVP, step and stop test).
static int64_t lanczos_stop_code(const std::vector<double>& alphas, const std::vector<double>& betas, double tol,
                          int64_t stop_rule, double margin) {
  const Extremes e = ritz_bounds(alphas, betas);
  const double scale = std::max(std::abs(e.lmin), std::abs(e.lmax));
  if (betas.back() <= 1e-12 * std::max(scale, 1e-300)) return 2;
  if (std::max(e.bmin, e.bmax) <= tol * scale) return 1;
  if (stop_rule == 1) {
    const bool max_dominant = std::abs(e.lmax) >= std::abs(e.lmin);
    const double bd = max_dominant ? e.bmax : e.bmin;
    const double other = max_dominant ? std::abs(e.lmin) + e.rmin : std::abs(e.lmax) + e.rmax;
    if (bd <= tol * scale && other <= (1.0 - margin) * scale) return 3;
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


// ------------------------------------------------------------------------------------------------------------
// Fused linear + softmax cross-entropy (the LM head and the loss in one op, row-chunked).
//   linear_xent(hidden[N,d], weight[V,d], labels[N]) -> (loss[N], probs[N,V])
//     loss_i = logsumexp(z_i) - z_i[y_i], z = hidden weight^T; probs = softmax(z) (0 rows where y_i is ignored).
//     probs is the only [N,V] buffer that outlives the call (saved for backward; a non-differentiable output).
//   linear_xent_backward(g[N], hidden, weight, probs, labels) -> (grad_hidden[N,d], grad_weight[V,d])
//     with G = diag(g)(P - Y): grad_hidden = G W = g (P W - W[y]), grad_weight = G^T H = P^T (g H) - scatter(y, g H).
//     probs must be linear_xent(hidden, weight)[1]: its derivative is taken analytically through hidden and
//     weight by the backward of this op, so probs itself gets no gradient.
//   linear_xent_hvp(u?, U?, g, hidden, weight, probs, labels) -> (d/dg, d/dhidden, d/dweight) of
//     <u, grad_hidden> + <U, grad_weight> (the double backward): with M = u W^T + H U^T (the cotangent on G),
//     s = rowsum(P M), K = g P (M - s):  d/dg = s - M[y];  d/dhidden = K W + g (P U - U[y]);
//     d/dweight = K^T H + P^T (g u) - scatter(y, g u).
// Every [N,V] intermediate lives for one chunk of rows only (chunk_rows; 0 = automatic, see chunk_size).
// Composite ATen code: the same source runs on CPU and CUDA. Matmuls run in the input dtype; softmax, P and the
// row reductions in float32 (float64 for float64 inputs), like finetune.py's float32 loss over bf16 logits.
namespace {

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows per chunk: all rows when N*V <= 2^22 elements; else at most 2^22 elements and at most 1/8 of the rows,
// so the per-chunk temporaries stay small next to probs (the one [N, V] buffer that is kept).
int64_t chunk_size(int64_t N, int64_t V, int64_t chunk_rows) {
  if (chunk_rows > 0) return std::max<int64_t>(1, std::min(N, chunk_rows));
  constexpr int64_t kChunkElems = int64_t(1) << 22;
  V = std::max<int64_t>(V, 1);
  if (N * V <= kChunkElems) return std::max<int64_t>(N, 1);
  return std::max<int64_t>(1, std::min<int64_t>(kChunkElems / V, (N + 7) / 8));
}

void check_linear_xent(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "linear_xent: hidden must be [N, d] and weight [V, d]");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "linear_xent: hidden is [N, ", hidden.size(1), "] but weight is [",
              weight.size(0), ", ", weight.size(1), "]");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "linear_xent: hidden and weight dtypes differ");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), "linear_xent: labels must be [N]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "linear_xent: labels must be int64");
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == labels.device(),
              "linear_xent: tensors on different devices");
}

// valid rows (label != ignore_index) as acc-dtype 0/1 column [N,1] and labels with ignored rows set to 0
std::pair<at::Tensor, at::Tensor> label_masks(const at::Tensor& labels, int64_t ignore_index, at::ScalarType acc) {
  at::Tensor valid = labels.ne(ignore_index);
  at::Tensor safe = labels.masked_fill(valid.logical_not(), 0);
  return {valid.to(acc).unsqueeze(1), safe.unsqueeze(1)};
}

inline at::Tensor as(const at::Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// out += a b (out may be wider than a, b: float32 accumulators for bf16 matmuls)
inline void add_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) out.addmm_(a, b);
  else out.add_(at::mm(a, b).to(out.scalar_type()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_xent(const at::Tensor& hidden, const at::Tensor& weight,
                                               const at::Tensor& labels, int64_t ignore_index, int64_t chunk_rows) {
  check_linear_xent(hidden, weight, labels);
  const int64_t N = hidden.size(0), V = weight.size(0);
  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  {
    at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(V)));
    TORCH_CHECK(!bad.any().item<bool>(), "linear_xent: a label is out of range [0, ", V, ")");
  }
  auto [valid, safe] = label_masks(labels, ignore_index, acc);
  at::Tensor probs = at::empty({N, V}, hidden.options().dtype(acc));
  at::Tensor loss = at::empty({N}, hidden.options().dtype(acc));
  const int64_t c = chunk_size(N, V, chunk_rows);
  const at::Tensor wt = weight.t();
  for (int64_t r0 = 0; r0 < N; r0 += c) {
    const int64_t n = std::min(c, N - r0);
    at::Tensor Z = probs.narrow(0, r0, n);  // logits, then probabilities, in place
    if (hidden.scalar_type() == acc) at::mm_out(Z, hidden.narrow(0, r0, n), wt);
    else Z.copy_(at::mm(hidden.narrow(0, r0, n), wt));
    at::Tensor vc = valid.narrow(0, r0, n);
    at::Tensor lse = at::logsumexp(Z, {1}, /*keepdim=*/true);
    loss.narrow(0, r0, n).copy_(((lse - Z.gather(1, safe.narrow(0, r0, n))) * vc).squeeze(1));
    Z.sub_(lse).exp_().mul_(vc);
  }
  return {loss, probs};
}

std::tuple<at::Tensor, at::Tensor> linear_xent_backward(const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                        const at::Tensor& weight, const at::Tensor& probs,
                                                        const at::Tensor& labels, int64_t ignore_index,
                                                        int64_t chunk_rows) {
  check_linear_xent(hidden, weight, labels);
  const int64_t N = hidden.size(0), V = weight.size(0);
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == N && probs.size(1) == V, "linear_xent_backward: probs must be [N, V]");
  TORCH_CHECK(grad_loss.numel() == N, "linear_xent_backward: grad_loss must have one entry per row");
  const at::ScalarType dt = hidden.scalar_type(), acc = probs.scalar_type();
  auto [valid, safe] = label_masks(labels, ignore_index, acc);
  at::Tensor g = as(grad_loss.reshape({N, 1}), acc);
  at::Tensor gh = at::empty_like(hidden);
  at::Tensor gw = at::zeros({V, weight.size(1)}, weight.options().dtype(acc));
  const int64_t c = chunk_size(N, V, chunk_rows);
  for (int64_t r0 = 0; r0 < N; r0 += c) {
    const int64_t n = std::min(c, N - r0);
    at::Tensor Pc = as(probs.narrow(0, r0, n), dt);
    at::Tensor gc = g.narrow(0, r0, n), sc = safe.narrow(0, r0, n).squeeze(1);
    at::Tensor gv = gc * valid.narrow(0, r0, n);
    at::Tensor hc = as(hidden.narrow(0, r0, n), acc);
    // grad_hidden rows: g (P W - W[y])
    gh.narrow(0, r0, n).copy_(gc * as(at::mm(Pc, weight), acc) - gv * as(weight.index_select(0, sc), acc));
    // grad_weight: P^T (g H) - scatter(y, g H)
    add_mm(gw, Pc.t(), as(gc * hc, dt));
    gw.index_add_(0, sc, -(gv * hc));
  }
  return {gh, as(gw, weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_xent_hvp(const c10::optional<at::Tensor>& u_,
                                                               const c10::optional<at::Tensor>& U_,
                                                               const at::Tensor& grad_loss, const at::Tensor& hidden,
                                                               const at::Tensor& weight, const at::Tensor& probs,
                                                               const at::Tensor& labels, int64_t ignore_index,
                                                               int64_t chunk_rows) {
  check_linear_xent(hidden, weight, labels);
  const int64_t N = hidden.size(0), V = weight.size(0), d = hidden.size(1);
  TORCH_CHECK(probs.dim() == 2 && probs.size(0) == N && probs.size(1) == V, "linear_xent_hvp: probs must be [N, V]");
  const bool has_u = u_.has_value() && u_->defined(), has_U = U_.has_value() && U_->defined();
  if (has_u) TORCH_CHECK(u_->sizes() == hidden.sizes(), "linear_xent_hvp: u must be shaped like hidden");
  if (has_U) TORCH_CHECK(U_->sizes() == weight.sizes(), "linear_xent_hvp: U must be shaped like weight");
  const at::ScalarType dt = hidden.scalar_type(), acc = probs.scalar_type();
  at::Tensor gg = at::zeros({N}, grad_loss.options());
  at::Tensor dh = at::zeros({N, d}, hidden.options().dtype(acc));
  at::Tensor dw = at::zeros({V, d}, weight.options().dtype(acc));
  if (!has_u && !has_U) return {gg, as(dh, dt), as(dw, weight.scalar_type())};
  auto [valid, safe] = label_masks(labels, ignore_index, acc);
  at::Tensor g = as(grad_loss.reshape({N, 1}), acc);
  const at::Tensor u = has_u ? as(*u_, dt) : at::Tensor(), U = has_U ? as(*U_, dt) : at::Tensor();
  const int64_t c = chunk_size(N, V, chunk_rows);
  for (int64_t r0 = 0; r0 < N; r0 += c) {
    const int64_t n = std::min(c, N - r0);
    at::Tensor Pc = probs.narrow(0, r0, n), hc = hidden.narrow(0, r0, n);
    at::Tensor gc = g.narrow(0, r0, n), vc = valid.narrow(0, r0, n), sc = safe.narrow(0, r0, n);
    at::Tensor gv = gc * vc;
    at::Tensor M;  // cotangent on G = diag(g)(P - Y): u W^T + H U^T, [n, V]
    if (has_u) M = as(at::mm(u.narrow(0, r0, n), weight.t()), acc);
    if (has_U) {
      if (M.defined() && dt == acc) M.addmm_(hc, U.t());
      else if (M.defined()) M.add_(at::mm(hc, U.t()));
      else M = as(at::mm(hc, U.t()), acc);
    }
    at::Tensor s = at::bmm(M.unsqueeze(1), Pc.unsqueeze(2)).view({n, 1});  // rowsum(P M)
    gg.narrow(0, r0, n).copy_(((s - M.gather(1, sc)) * vc).squeeze(1));
    M.sub_(s).mul_(Pc).mul_(gc);  // K = g P (M - s), in place
    at::Tensor K = as(M, dt);
    at::Tensor dhc = as(at::mm(K, weight), acc);
    add_mm(dw, K.t(), hc);
    if (has_U) {
      at::Tensor Pd = as(Pc, dt);
      dhc.add_(gc * as(at::mm(Pd, U), acc) - gv * as(U.index_select(0, sc.squeeze(1)), acc));
    }
    if (has_u) {
      at::Tensor gu = gc * as(u.narrow(0, r0, n), acc);
      add_mm(dw, as(Pc, dt).t(), as(gu, dt));
      dw.index_add_(0, sc.squeeze(1), -(gu * vc));
    }
    dh.narrow(0, r0, n).copy_(dhc);
  }
  return {gg, as(dh, dt), as(dw, weight.scalar_type())};
}

TORCH_LIBRARY(hessian, m) {
  m.def("lanczos_step(Tensor[] w, Tensor[] v, Tensor(a!)[] v_prev, Tensor beta) -> Tensor");
  m.def("power_step(Tensor[] w, Tensor(a!)[] v) -> Tensor");
  m.def("shard_dot(Tensor[] w, Tensor[] v) -> Tensor");
  m.def("lanczos_update(Tensor[] w, Tensor[] v, Tensor(a!)[] v_prev, Tensor alpha, Tensor beta) -> Tensor");
  m.def("softmax_xent(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  m.def("softmax_xent_backward(Tensor grad_loss, Tensor probs, Tensor labels, int ignore_index) -> Tensor");
  m.def(
      "softmax_xent_backward_backward(Tensor ggrad, Tensor grad_loss, Tensor probs, Tensor labels, "
      "int ignore_index) -> (Tensor, Tensor)");
  m.def("softmax_backward(Tensor grad_probs, Tensor probs) -> Tensor");
  m.def("softmax_backward_backward(Tensor ggrad, Tensor grad_probs, Tensor probs) -> (Tensor, Tensor)");
  m.def("multi_dot(Tensor[] a, Tensor[] b) -> Tensor");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor w, Tensor rstd) -> (Tensor, Tensor)");
  m.def(
      "rms_norm_backward_backward(Tensor gg_x, Tensor gg_w, Tensor grad_y, Tensor x, Tensor w, Tensor rstd) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("swiglu_backward(Tensor grad_h, Tensor a, Tensor b, Tensor s) -> (Tensor, Tensor)");
  m.def(
      "swiglu_backward_backward(Tensor gg_a, Tensor gg_b, Tensor grad_h, Tensor a, Tensor b, Tensor s) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool adjoint) -> Tensor");
  m.def("linear_xent(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, int chunk_rows=0) -> (Tensor, Tensor)");
  m.def(
      "linear_xent_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor probs, Tensor labels, "
      "int ignore_index, int chunk_rows=0) -> (Tensor, Tensor)");
  m.def(
      "linear_xent_hvp(Tensor? u, Tensor? U, Tensor grad_loss, Tensor hidden, Tensor weight, Tensor probs, "
      "Tensor labels, int ignore_index, int chunk_rows=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lanczos_solve(Tensor[] grads, int[] grad_index, Tensor[] params, Tensor[] v0, int max_iter, float tol, "
      "int stop_rule=1, float margin=0.05) -> (Tensor, Tensor, int, Tensor)");
  m.def(
      "power_solve(Tensor[] grads, int[] grad_index, Tensor[] params, Tensor[] v0, int max_iter, float tol) "
      "-> (Tensor, int, Tensor)");
}

TORCH_LIBRARY_IMPL(hessian, CompositeExplicitAutograd, m) {
  m.impl("linear_xent", &linear_xent);
  m.impl("linear_xent_backward", &linear_xent_backward);
  m.impl("linear_xent_hvp", &linear_xent_hvp);
}

TORCH_LIBRARY_IMPL(hessian, CompositeImplicitAutograd, m) {
  m.impl("lanczos_solve", &lanczos_solve);
  m.impl("power_solve", &power_solve);
}

}  // namespace hessian
