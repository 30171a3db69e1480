// CPU kernels of the `hessian` operator library (see csrc/hessian.cpp for the schemas).
//
// Multi-tensor solver steps: one pass per phase over every parameter tensor, no flattening copies,
// all reductions accumulated in float64 (at::parallel_reduce over each tensor's elements).
// Softmax cross-entropy: row-parallel; the forward saves the softmax probabilities (one logits-sized
// buffer) so that the backward and the double backward need no exp() at all.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace hessian {
namespace {

constexpr int64_t kGrain = 32768;

inline double to_d(float x) { return static_cast<double>(x); }
inline double to_d(double x) { return x; }
inline double to_d(c10::BFloat16 x) { return static_cast<double>(static_cast<float>(x)); }
inline double to_d(c10::Half x) { return static_cast<double>(static_cast<float>(x)); }

void check_lists(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b, const char* what) {
  TORCH_CHECK(a.size() == b.size(), what, ": tensor lists differ in length (", a.size(), " vs ", b.size(), ")");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].numel() == b[i].numel(), what, ": tensor ", i, " sizes differ");
    TORCH_CHECK(a[i].scalar_type() == b[i].scalar_type(), what, ": tensor ", i, " dtypes differ");
    TORCH_CHECK(a[i].device().is_cpu() && b[i].device().is_cpu(), what, ": CPU kernel got a non-CPU tensor");
  }
}

// sum_i a_i * b_i over all tensors, float64 accumulation. Eight partial sums in turn: one running sum waits
// for each addition to finish (four cycles an element), eight keep the adder busy.
template <typename scalar_t>
double dot_range(const scalar_t* pa, const scalar_t* pb, int64_t lo, int64_t hi) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = lo;
  for (; i + 8 <= hi; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += to_d(pa[i + k]) * to_d(pb[i + k]);
  for (; i < hi; ++i) acc[0] += to_d(pa[i]) * to_d(pb[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

double multi_dot(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double total = 0.0;
  for (size_t t = 0; t < a.size(); ++t) {
    at::Tensor ac = a[t].contiguous(), bc = b[t].contiguous();  // no copy when already contiguous
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ac.scalar_type(), "multi_dot", [&] {
      const scalar_t* pa = ac.data_ptr<scalar_t>();
      const scalar_t* pb = bc.data_ptr<scalar_t>();
      total += at::parallel_reduce(
          0, ac.numel(), kGrain, 0.0,
          [&](int64_t lo, int64_t hi, double acc) { return acc + dot_range(pa, pb, lo, hi); },
          std::plus<double>());
    });
  }
  return total;
}

// r = w - alpha v - beta v_prev written into v_prev (float64 arithmetic); returns ||r||^2 in float64.
double residual_into(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& v,
                     std::vector<at::Tensor>& vp, double alpha, double beta) {
  double sq = 0.0;
  for (size_t t = 0; t < w.size(); ++t) {
    at::Tensor wc = w[t].contiguous(), vc = v[t].contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wc.scalar_type(), "lanczos_residual", [&] {
      const scalar_t* pw = wc.data_ptr<scalar_t>();
      const scalar_t* pv = vc.data_ptr<scalar_t>();
      scalar_t* pp = vp[t].data_ptr<scalar_t>();
      sq += at::parallel_reduce(
          0, wc.numel(), kGrain, 0.0,
          [&](int64_t lo, int64_t hi, double acc) {
            for (int64_t i = lo; i < hi; ++i) {
              const scalar_t r = static_cast<scalar_t>(to_d(pw[i]) - alpha * to_d(pv[i]) - beta * to_d(pp[i]));
              pp[i] = r;
              const double rd = to_d(r);
              acc += rd * rd;
            }
            return acc;
          },
          std::plus<double>());
    });
  }
  return sq;
}

}  // namespace

// Lanczos three-term recurrence step.
//   alpha = <w, v>;  r = w - alpha v - beta v_prev;  beta_next = ||r||;  v_prev <- r / beta_next
// v_prev is overwritten with the next Lanczos vector (the caller swaps v and v_prev afterwards).
at::Tensor lanczos_step_cpu(at::TensorList w_, at::TensorList v_, at::TensorList vp_, const at::Tensor& beta_t) {
  std::vector<at::Tensor> w(w_.begin(), w_.end()), v(v_.begin(), v_.end()), vp(vp_.begin(), vp_.end());
  check_lists(w, v, "lanczos_step");
  check_lists(w, vp, "lanczos_step");
  for (auto& t : vp) TORCH_CHECK(t.is_contiguous(), "lanczos_step: v_prev tensors must be contiguous");
  const double beta = beta_t.item<double>();
  const double alpha = multi_dot(w, v);
  const double sq = residual_into(w, v, vp, alpha, beta);
  const double beta_next = std::sqrt(sq);
  const double inv = beta_next > 0.0 ? 1.0 / beta_next : 0.0;
  for (size_t t = 0; t < vp.size(); ++t) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, vp[t].scalar_type(), "lanczos_scale", [&] {
      scalar_t* pp = vp[t].data_ptr<scalar_t>();
      at::parallel_for(0, vp[t].numel(), kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) pp[i] = static_cast<scalar_t>(to_d(pp[i]) * inv);
      });
    });
  }
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = alpha;
  out.data_ptr<double>()[1] = beta_next;
  return out;
}

// The halves of lanczos_step for one shard of a vector split across processes (the caller all-reduces
// the float64 scalars in between): shard_dot -> [<w,v>, <w,w>]; lanczos_update: r = w - alpha v - beta v_prev
// into v_prev, returns [||r||^2] of this shard (the caller scales v_prev by 1/sqrt of the global sum).
at::Tensor shard_dot_cpu(at::TensorList w_, at::TensorList v_) {
  std::vector<at::Tensor> w(w_.begin(), w_.end()), v(v_.begin(), v_.end());
  check_lists(w, v, "shard_dot");
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = multi_dot(w, v);
  out.data_ptr<double>()[1] = multi_dot(w, w);
  return out;
}

at::Tensor lanczos_update_cpu(at::TensorList w_, at::TensorList v_, at::TensorList vp_, const at::Tensor& alpha_t,
                              const at::Tensor& beta_t) {
  std::vector<at::Tensor> w(w_.begin(), w_.end()), v(v_.begin(), v_.end()), vp(vp_.begin(), vp_.end());
  check_lists(w, v, "lanczos_update");
  check_lists(w, vp, "lanczos_update");
  for (auto& t : vp) TORCH_CHECK(t.is_contiguous(), "lanczos_update: v_prev tensors must be contiguous");
  const double alpha = alpha_t.item<double>(), beta = beta_t.item<double>();
  const double sq = residual_into(w, v, vp, alpha, beta);
  at::Tensor out = at::empty({1}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = sq;
  return out;
}

// Power iteration step: rq = <w, v>, nrm = ||w||, v <- w / nrm. Returns [rq, nrm] in float64.
at::Tensor power_step_cpu(at::TensorList w_, at::TensorList v_) {
  std::vector<at::Tensor> w(w_.begin(), w_.end()), v(v_.begin(), v_.end());
  check_lists(w, v, "power_step");
  for (auto& t : v) TORCH_CHECK(t.is_contiguous(), "power_step: v tensors must be contiguous");
  double rq = 0.0, sq = 0.0;
  for (size_t t = 0; t < w.size(); ++t) {
    at::Tensor wc = w[t].contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wc.scalar_type(), "power_dot", [&] {
      const scalar_t* pw = wc.data_ptr<scalar_t>();
      const scalar_t* pv = v[t].data_ptr<scalar_t>();
      using P = std::pair<double, double>;
      P r = at::parallel_reduce(
          0, wc.numel(), kGrain, P(0.0, 0.0),
          [&](int64_t lo, int64_t hi, P acc) {
            for (int64_t i = lo; i < hi; ++i) {
              const double a = to_d(pw[i]);
              acc.first += a * to_d(pv[i]);
              acc.second += a * a;
            }
            return acc;
          },
          [](P x, P y) { return P(x.first + y.first, x.second + y.second); });
      rq += r.first;
      sq += r.second;
    });
  }
  const double nrm = std::sqrt(sq);
  const double inv = nrm > 0.0 ? 1.0 / nrm : 0.0;
  for (size_t t = 0; t < w.size(); ++t) {
    at::Tensor wc = w[t].contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, wc.scalar_type(), "power_scale", [&] {
      const scalar_t* pw = wc.data_ptr<scalar_t>();
      scalar_t* pv = v[t].data_ptr<scalar_t>();
      at::parallel_for(0, wc.numel(), kGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) pv[i] = static_cast<scalar_t>(to_d(pw[i]) * inv);
      });
    });
  }
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = rq;
  out.data_ptr<double>()[1] = nrm;
  return out;
}

namespace {
void check_xent(const at::Tensor& x, const at::Tensor& labels) {
  TORCH_CHECK(x.dim() == 2, "softmax_xent: expected 2-D [rows, vocab] tensor, got ", x.dim(), "-D");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "softmax_xent: labels must be [rows]");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "softmax_xent: labels must be int64");
  TORCH_CHECK(x.device().is_cpu() && labels.device().is_cpu(), "softmax_xent: CPU kernel got a non-CPU tensor");
}
at::ScalarType loss_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
}  // namespace

// loss_i = logsumexp(x_i) - x_i[y_i] (0 where y_i == ignore_index); probs_i = softmax(x_i) (0 rows where ignored)
std::tuple<at::Tensor, at::Tensor> softmax_xent_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                    int64_t ignore_index) {
  check_xent(logits, labels);
  at::Tensor x = logits.contiguous(), y = labels.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  at::Tensor probs = at::empty_like(x);
  at::Tensor loss = at::empty({N}, x.options().dtype(loss_dtype(x.scalar_type())));
  const int64_t* py = y.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(py[i] == ignore_index || (py[i] >= 0 && py[i] < V), "softmax_xent: label ", py[i],
                " out of range [0, ", V, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "softmax_xent", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* pp = probs.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> e(V);
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* xr = px + r * V;
        scalar_t* prow = pp + r * V;
        if (py[r] == ignore_index) {
          for (int64_t j = 0; j < V; ++j) prow[j] = scalar_t(0);
          if constexpr (std::is_same_v<scalar_t, double>) loss.data_ptr<double>()[r] = 0.0;
          else loss.data_ptr<float>()[r] = 0.f;
          continue;
        }
        acc_t m = static_cast<acc_t>(xr[0]);
        for (int64_t j = 1; j < V; ++j) m = std::max(m, static_cast<acc_t>(xr[j]));
        double s = 0.0;
        for (int64_t j = 0; j < V; ++j) {
          e[j] = std::exp(static_cast<acc_t>(xr[j]) - m);
          s += static_cast<double>(e[j]);
        }
        const acc_t inv = static_cast<acc_t>(1.0 / s);
        for (int64_t j = 0; j < V; ++j) prow[j] = static_cast<scalar_t>(e[j] * inv);
        const double l = static_cast<double>(m) + std::log(s) - to_d(xr[py[r]]);
        if constexpr (std::is_same_v<scalar_t, double>) loss.data_ptr<double>()[r] = l;
        else loss.data_ptr<float>()[r] = static_cast<float>(l);
      }
    });
  });
  return {loss, probs};
}

// d loss / d logits: g_i * (p_i - onehot(y_i))
at::Tensor softmax_xent_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& probs, const at::Tensor& labels,
                                     int64_t ignore_index) {
  check_xent(probs, labels);
  at::Tensor p = probs.contiguous(), y = labels.contiguous();
  at::Tensor g = grad_loss.to(at::kDouble).contiguous();
  const int64_t N = p.size(0), V = p.size(1);
  TORCH_CHECK(g.numel() == N, "softmax_xent_backward: grad_loss must have one entry per row");
  at::Tensor out = at::empty_like(p);
  const int64_t* py = y.data_ptr<int64_t>();
  const double* pg = g.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "softmax_xent_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        scalar_t* orow = po + r * V;
        if (py[r] == ignore_index) {
          for (int64_t j = 0; j < V; ++j) orow[j] = scalar_t(0);
          continue;
        }
        const scalar_t* prow = pp + r * V;
        const acc_t gr = static_cast<acc_t>(pg[r]);
        for (int64_t j = 0; j < V; ++j) orow[j] = static_cast<scalar_t>(gr * static_cast<acc_t>(prow[j]));
        orow[py[r]] = static_cast<scalar_t>(pg[r] * (to_d(prow[py[r]]) - 1.0));
      }
    });
  });
  return out;
}

// Backward of softmax_xent_backward w.r.t. (grad_loss, probs), given W = d/d(grad_logits):
//   d/d grad_loss_i = <W_i, p_i> - W_i[y_i];   d/d probs_i = g_i * W_i
std::tuple<at::Tensor, at::Tensor> softmax_xent_backward_backward_cpu(const at::Tensor& ggrad,
                                                                      const at::Tensor& grad_loss,
                                                                      const at::Tensor& probs,
                                                                      const at::Tensor& labels, int64_t ignore_index) {
  check_xent(probs, labels);
  TORCH_CHECK(ggrad.sizes() == probs.sizes(), "softmax_xent_backward_backward: ggrad must match probs");
  at::Tensor W = ggrad.to(probs.scalar_type()).contiguous(), p = probs.contiguous(), y = labels.contiguous();
  at::Tensor g = grad_loss.to(at::kDouble).contiguous();
  const int64_t N = p.size(0), V = p.size(1);
  at::Tensor gg = at::empty({N}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor gp = at::empty_like(p);
  const int64_t* py = y.data_ptr<int64_t>();
  const double* pg = g.data_ptr<double>();
  double* pgg = gg.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "softmax_xent_backward_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pw = W.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* pgp = gp.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        scalar_t* orow = pgp + r * V;
        if (py[r] == ignore_index) {
          for (int64_t j = 0; j < V; ++j) orow[j] = scalar_t(0);
          pgg[r] = 0.0;
          continue;
        }
        const scalar_t* wrow = pw + r * V;
        const scalar_t* prow = pp + r * V;
        const acc_t gr = static_cast<acc_t>(pg[r]);
        double d = 0.0;
        for (int64_t j = 0; j < V; ++j) {
          const acc_t wj = static_cast<acc_t>(wrow[j]);
          d += static_cast<double>(wj * static_cast<acc_t>(prow[j]));
          orow[j] = static_cast<scalar_t>(gr * wj);
        }
        pgg[r] = d - to_d(wrow[py[r]]);
      }
    });
  });
  return {gg.to(grad_loss.scalar_type()), gp};
}

// Softmax VJP: p * (G - <p, G>) row-wise
at::Tensor softmax_backward_cpu(const at::Tensor& grad_probs, const at::Tensor& probs) {
  TORCH_CHECK(probs.dim() == 2 && grad_probs.sizes() == probs.sizes(), "softmax_backward: shape mismatch");
  at::Tensor G = grad_probs.to(probs.scalar_type()).contiguous(), p = probs.contiguous();
  const int64_t N = p.size(0), V = p.size(1);
  at::Tensor out = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "softmax_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pG = G.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* Grow = pG + r * V;
        const scalar_t* prow = pp + r * V;
        double d = 0.0;
        for (int64_t j = 0; j < V; ++j) d += static_cast<double>(static_cast<acc_t>(Grow[j]) * static_cast<acc_t>(prow[j]));
        const acc_t dd = static_cast<acc_t>(d);
        for (int64_t j = 0; j < V; ++j)
          po[r * V + j] = static_cast<scalar_t>(static_cast<acc_t>(prow[j]) * (static_cast<acc_t>(Grow[j]) - dd));
      }
    });
  });
  return out;
}

// Backward of dx = p * (G - <G, p>) (softmax's VJP along the last dim) w.r.t. (G, p), given W = d/d dx:
//   d/dG = p * (W - <W, p>);   d/dp = W * (G - <G, p>) - G * <W, p>
// Autograd spends about seven passes over the [rows, V] tensors on this (softmax_double_backward); here one
// row at a time stays in cache: read W, G, p once for the two dot products and once for the two outputs.
std::tuple<at::Tensor, at::Tensor> softmax_backward_backward_cpu(const at::Tensor& ggrad, const at::Tensor& grad_probs,
                                                                 const at::Tensor& probs) {
  TORCH_CHECK(probs.dim() >= 1 && ggrad.sizes() == probs.sizes() && grad_probs.sizes() == probs.sizes(),
              "softmax_backward_backward: ggrad, grad_probs and probs must have one shape");
  TORCH_CHECK(ggrad.scalar_type() == probs.scalar_type() && grad_probs.scalar_type() == probs.scalar_type(),
              "softmax_backward_backward: ggrad, grad_probs and probs must have one dtype");
  at::Tensor W = ggrad.contiguous(), G = grad_probs.contiguous(), p = probs.contiguous();
  const int64_t V = p.numel() ? p.size(-1) : 1, N = V ? p.numel() / V : 0;
  at::Tensor dG = at::empty_like(p), dp = at::empty_like(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "softmax_backward_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* pW = W.data_ptr<scalar_t>();
    const scalar_t* pG = G.data_ptr<scalar_t>();
    const scalar_t* pp = p.data_ptr<scalar_t>();
    scalar_t* odG = dG.data_ptr<scalar_t>();
    scalar_t* odp = dp.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrain / std::max<int64_t>(V, 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const scalar_t* w = pW + r * V;
        const scalar_t* g = pG + r * V;
        const scalar_t* q = pp + r * V;
        acc_t wp = 0, gp = 0;
        for (int64_t j = 0; j < V; ++j) {
          const acc_t qj = static_cast<acc_t>(q[j]);
          wp += static_cast<acc_t>(w[j]) * qj;
          gp += static_cast<acc_t>(g[j]) * qj;
        }
        scalar_t* a = odG + r * V;
        scalar_t* b = odp + r * V;
        for (int64_t j = 0; j < V; ++j) {
          const acc_t wj = static_cast<acc_t>(w[j]), gj = static_cast<acc_t>(g[j]);
          a[j] = static_cast<scalar_t>(static_cast<acc_t>(q[j]) * (wj - wp));
          b[j] = static_cast<scalar_t>(wj * (gj - gp) - gj * wp);
        }
      }
    });
  });
  return {dG, dp};
}

// <a, b> over all tensors of the two lists, float64 accumulation (solvers._dot's inner product, without its
// float64 copies): one float64 scalar.
at::Tensor multi_dot_cpu(at::TensorList a_, at::TensorList b_) {
  std::vector<at::Tensor> a(a_.begin(), a_.end()), b(b_.begin(), b_.end());
  check_lists(a, b, "multi_dot");
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  out.data_ptr<double>()[0] = multi_dot(a, b);
  return out;
}

// ----------------------------------------------------------------------- RMSNorm and the SwiGLU gate (CPU)
// y = w * x * rstd along the last dim (n), rstd = (mean(x^2) + eps)^-1/2 per row (given, from the forward).
// The rows are cut into at most kRowChunks fixed chunks: each chunk sums its rows' share of the weight's
// gradient into a buffer of its own and the chunks are added in order, so the result does not depend on
// the number of threads.
constexpr int64_t kRowChunks = 64;

struct Rows {
  int64_t n, rows, chunks, per_chunk;
};

Rows row_layout(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd, const char* what) {
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0), what, ": w must be 1-D of x's last size");
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  TORCH_CHECK(rstd.numel() == rows, what, ": rstd must hold one value per row of x (", rows, "), got ",
              rstd.numel());
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && rstd.scalar_type() == x.scalar_type(), what,
              ": x, w and rstd must have one dtype");
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kRowChunks, rows));
  return {n, rows, chunks, (rows + chunks - 1) / chunks};
}

template <typename acc_t, typename scalar_t>
void add_chunks(const std::vector<acc_t>& part, int64_t chunks, int64_t n, scalar_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[c * n + j];
    out[j] = static_cast<scalar_t>(s);
  }
}

// First backward: u = w gy, c = <x, u> / n;  gx = rstd u - rstd^3 c x;  gw = sum over rows of gy x rstd.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x_,
                                                         const at::Tensor& w_, const at::Tensor& rstd_) {
  TORCH_CHECK(grad_y.sizes() == x_.sizes() && grad_y.scalar_type() == x_.scalar_type(),
              "rms_norm_backward: grad_y must have x's shape and dtype");
  const Rows L = row_layout(x_, w_, rstd_, "rms_norm_backward");
  at::Tensor gy = grad_y.contiguous(), x = x_.contiguous(), w = w_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor gx = at::empty_like(x), gw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pg = gy.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>();
    const scalar_t* pr = rstd.data_ptr<scalar_t>();
    scalar_t* ogx = gx.data_ptr<scalar_t>();
    const int64_t n = L.n;
    std::vector<acc_t> part(L.chunks * n, acc_t(0));
    at::parallel_for(0, L.chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* gwp = part.data() + c * n;
        for (int64_t r = c * L.per_chunk; r < std::min(L.rows, (c + 1) * L.per_chunk); ++r) {
          const scalar_t *g = pg + r * n, *xr = px + r * n;
          const acc_t rs = static_cast<acc_t>(pr[r]);
          acc_t xu = 0;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t gj = static_cast<acc_t>(g[j]), xj = static_cast<acc_t>(xr[j]);
            xu += xj * static_cast<acc_t>(pw[j]) * gj;
            gwp[j] += gj * xj * rs;
          }
          const acc_t k = rs * rs * rs * xu / static_cast<acc_t>(n);
          scalar_t* o = ogx + r * n;
          for (int64_t j = 0; j < n; ++j)
            o[j] = static_cast<scalar_t>(rs * static_cast<acc_t>(pw[j]) * static_cast<acc_t>(g[j]) -
                                         k * static_cast<acc_t>(xr[j]));
        }
      }
    });
    add_chunks(part, L.chunks, n, gw.data_ptr<scalar_t>());
  });
  return {gx, gw};
}

// The backward of that backward, given A = d/d gx and B = d/d gw (per row: au = <A, u>, ax = <A, x>,
// bg = <B gy, x>; P = rstd A - rstd^3 ax / n x):
//   d gy = w P + B x rstd;   d w = sum over rows of gy P;
//   d x  = x (3 rstd^5 c ax - rstd^3 au - rstd^3 bg) / n - rstd^3 ax / n u - rstd^3 c A + rstd B gy.
// Autograd spends some thirty passes over [rows, n] on this; here each row is read twice.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_backward_backward_cpu(
    const at::Tensor& gg_x, const at::Tensor& gg_w, const at::Tensor& grad_y, const at::Tensor& x_,
    const at::Tensor& w_, const at::Tensor& rstd_) {
  TORCH_CHECK(gg_x.sizes() == x_.sizes() && grad_y.sizes() == x_.sizes() && gg_w.sizes() == w_.sizes() &&
                  gg_x.scalar_type() == x_.scalar_type() && grad_y.scalar_type() == x_.scalar_type() &&
                  gg_w.scalar_type() == x_.scalar_type(),
              "rms_norm_backward_backward: gg_x and grad_y must have x's shape and dtype, gg_w w's");
  const Rows L = row_layout(x_, w_, rstd_, "rms_norm_backward_backward");
  at::Tensor A = gg_x.contiguous(), B = gg_w.contiguous(), gy = grad_y.contiguous(), x = x_.contiguous();
  at::Tensor w = w_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor dgy = at::empty_like(x), dx = at::empty_like(x), dw = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_backward_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pa = A.data_ptr<scalar_t>(), *pb = B.data_ptr<scalar_t>(), *pg = gy.data_ptr<scalar_t>();
    const scalar_t *px = x.data_ptr<scalar_t>(), *pw = w.data_ptr<scalar_t>(), *pr = rstd.data_ptr<scalar_t>();
    scalar_t *ogy = dgy.data_ptr<scalar_t>(), *ox = dx.data_ptr<scalar_t>();
    const int64_t n = L.n;
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
    std::vector<acc_t> part(L.chunks * n, acc_t(0));
    at::parallel_for(0, L.chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* dwp = part.data() + c * n;
        for (int64_t r = c * L.per_chunk; r < std::min(L.rows, (c + 1) * L.per_chunk); ++r) {
          const scalar_t *a = pa + r * n, *g = pg + r * n, *xr = px + r * n;
          const acc_t rs = static_cast<acc_t>(pr[r]), rs3 = rs * rs * rs;
          acc_t xu = 0, au = 0, ax = 0, bg = 0;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t xj = static_cast<acc_t>(xr[j]), aj = static_cast<acc_t>(a[j]);
            const acc_t gj = static_cast<acc_t>(g[j]), uj = static_cast<acc_t>(pw[j]) * gj;
            xu += xj * uj;
            au += aj * uj;
            ax += aj * xj;
            bg += static_cast<acc_t>(pb[j]) * gj * xj;
          }
          const acc_t cc = xu * inv_n;
          const acc_t kx = (3 * rs3 * rs * rs * cc * ax - rs3 * au - rs3 * bg) * inv_n;
          const acc_t ku = rs3 * ax * inv_n, ka = rs3 * cc;
          scalar_t *o1 = ogy + r * n, *o2 = ox + r * n;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t xj = static_cast<acc_t>(xr[j]), aj = static_cast<acc_t>(a[j]);
            const acc_t gj = static_cast<acc_t>(g[j]), wj = static_cast<acc_t>(pw[j]), bj = static_cast<acc_t>(pb[j]);
            const acc_t P = rs * aj - ku * xj;
            o1[j] = static_cast<scalar_t>(wj * P + bj * xj * rs);
            dwp[j] += gj * P;
            o2[j] = static_cast<scalar_t>(kx * xj - ku * wj * gj - ka * aj + rs * bj * gj);
          }
        }
      }
    });
    add_chunks(part, L.chunks, n, dw.data_ptr<scalar_t>());
  });
  return {dgy, dx, dw};
}

// h = silu(a) b (the SwiGLU gate), elementwise, given s = sigmoid(a) (saved by the forward: no exp() here, so
// the loops vectorise); silu' = s (1 + a (1 - s)), silu'' = s (1 - s) (2 + a (1 - 2 s)).
void swiglu_check(std::initializer_list<const at::Tensor*> ts, const char* what) {
  const at::Tensor& a = **ts.begin();
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->sizes() == a.sizes(), what, ": the tensors must have one shape");
    TORCH_CHECK(t->scalar_type() == a.scalar_type(), what, ": the tensors must have one dtype");
  }
}

// First backward: ga = gh b silu'(a), gb = gh silu(a).
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_h, const at::Tensor& a_,
                                                       const at::Tensor& b_, const at::Tensor& s_) {
  swiglu_check({&a_, &grad_h, &b_, &s_}, "swiglu_backward");
  at::Tensor gh = grad_h.contiguous(), a = a_.contiguous(), b = b_.contiguous(), sg = s_.contiguous();
  at::Tensor ga = at::empty_like(a), gb = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "swiglu_backward", [&] {
    const scalar_t *pg = gh.data_ptr<scalar_t>(), *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>();
    const scalar_t* ps = sg.data_ptr<scalar_t>();
    scalar_t *oa = ga.data_ptr<scalar_t>(), *ob = gb.data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t ai = pa[i], gi = pg[i], s = ps[i];
        oa[i] = gi * pb[i] * s * (scalar_t(1) + ai * (scalar_t(1) - s));
        ob[i] = gi * ai * s;
      }
    });
  });
  return {ga, gb};
}

// The backward of that backward, given A = d/d ga and B = d/d gb:
//   d gh = A b silu'(a) + B silu(a);  d a = gh (A b silu''(a) + B silu'(a));  d b = A gh silu'(a).
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_backward_backward_cpu(
    const at::Tensor& gg_a, const at::Tensor& gg_b, const at::Tensor& grad_h, const at::Tensor& a_,
    const at::Tensor& b_, const at::Tensor& s_) {
  swiglu_check({&a_, &gg_a, &gg_b, &grad_h, &b_, &s_}, "swiglu_backward_backward");
  at::Tensor A = gg_a.contiguous(), B = gg_b.contiguous(), gh = grad_h.contiguous();
  at::Tensor a = a_.contiguous(), b = b_.contiguous(), sg = s_.contiguous();
  at::Tensor dgh = at::empty_like(a), da = at::empty_like(a), db = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "swiglu_backward_backward", [&] {
    const scalar_t *pA = A.data_ptr<scalar_t>(), *pB = B.data_ptr<scalar_t>(), *pg = gh.data_ptr<scalar_t>();
    const scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>(), *ps = sg.data_ptr<scalar_t>();
    scalar_t *o1 = dgh.data_ptr<scalar_t>(), *o2 = da.data_ptr<scalar_t>(), *o3 = db.data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t ai = pa[i], bi = pb[i], gi = pg[i], Ai = pA[i], Bi = pB[i], s = ps[i];
        const scalar_t t = scalar_t(1) - s;
        const scalar_t d1 = s * (scalar_t(1) + ai * t), d2 = s * t * (scalar_t(2) + ai * (t - s));
        o1[i] = Ai * bi * d1 + Bi * ai * s;
        o2[i] = gi * (Ai * bi * d2 + Bi * d1);
        o3[i] = Ai * gi * d1;
      }
    });
  });
  return {dgh, da, db};
}

// The rotary embedding along the last dim (D = 2h) of x [..., T, D] with cos and sin broadcast to x's shape
// (HF's [B or 1, 1, T, D]): R x = x cos + rotate_half(x) sin, rotate_half(x) = (-x[h:], x[:h]); adjoint:
// R^T g = g cos - rotate_half(g sin). One pass for either, cos and sin read through their (broadcast) strides.
at::Tensor rotary_cpu(const at::Tensor& x_, const at::Tensor& cos_, const at::Tensor& sin_, bool adjoint) {
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) % 2 == 0, "rotary: x's last size must be even");
  TORCH_CHECK(cos_.scalar_type() == x_.scalar_type() && sin_.scalar_type() == x_.scalar_type(),
              "rotary: x, cos and sin must have one dtype");
  at::Tensor x = x_.contiguous();
  at::Tensor c, s;
  try {
    c = cos_.expand(x.sizes());
    s = sin_.expand(x.sizes());
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "rotary: cos and sin must broadcast to x's shape");
  }
  if (c.stride(-1) != 1) c = c.contiguous();
  if (s.stride(-1) != 1) s = s.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t D = x.size(-1), h = D / 2, rows = D ? x.numel() / D : 0, nd = x.dim();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rotary", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t *pc = c.data_ptr<scalar_t>(), *ps = s.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)), [&](int64_t lo, int64_t hi) {
      std::vector<int64_t> idx(nd, 0);
      for (int64_t r = lo; r < hi; ++r) {
        int64_t rem = r, oc = 0, os = 0;
        for (int64_t d = nd - 2; d >= 0; --d) {  // the row's index -> cos's and sin's offsets
          const int64_t i = rem % x.size(d);
          rem /= x.size(d);
          oc += i * c.stride(d);
          os += i * s.stride(d);
        }
        const scalar_t *xr = px + r * D, *cr = pc + oc, *sr = ps + os;
        scalar_t* o = po + r * D;
        if (!adjoint) {
          for (int64_t j = 0; j < h; ++j) {
            o[j] = xr[j] * cr[j] - xr[j + h] * sr[j];
            o[j + h] = xr[j + h] * cr[j + h] + xr[j] * sr[j + h];
          }
        } else {
          for (int64_t j = 0; j < h; ++j) {
            o[j] = xr[j] * cr[j] + xr[j + h] * sr[j + h];
            o[j + h] = xr[j + h] * cr[j + h] - xr[j] * sr[j];
          }
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(hessian, CPU, m) {
  m.impl("lanczos_step", &lanczos_step_cpu);
  m.impl("power_step", &power_step_cpu);
  m.impl("shard_dot", &shard_dot_cpu);
  m.impl("lanczos_update", &lanczos_update_cpu);
  m.impl("softmax_xent", &softmax_xent_cpu);
  m.impl("softmax_xent_backward", &softmax_xent_backward_cpu);
  m.impl("softmax_xent_backward_backward", &softmax_xent_backward_backward_cpu);
  m.impl("softmax_backward", &softmax_backward_cpu);
  m.impl("softmax_backward_backward", &softmax_backward_backward_cpu);
  m.impl("multi_dot", &multi_dot_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("rms_norm_backward_backward", &rms_norm_backward_backward_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("swiglu_backward_backward", &swiglu_backward_backward_cpu);
  m.impl("rotary", &rotary_cpu);
}

}  // namespace hessian
