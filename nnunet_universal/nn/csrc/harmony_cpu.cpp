// U-Harmony's four kernels for fp32 CPU tensors: HarmonyNorm and HarmonyRestore, forward and backward.
//
// The same equations as harmony_fused.py's *_math functions, on contiguous (B, C, N) tensors with per-channel
// parameters, one (sample, channel) row at a time (rows in parallel): each row is walked in blocks of BLK
// voxels whose temporaries stay in L1, so a layer costs two or three sweeps over its activation and no
// allocation. Built on first use by torch.utils.cpp_extension (harmony_cpu.py); without a compiler the
// chunked eager path of harmony_functions.py is used instead.
//
// Registered as PyTorch operators (namespace nnunet_universal_harmony, CPU kernels; the end of this file): each
// layer's forward or backward is one dispatched operation that takes the activation in its own shape (B, C, ...)
// and allocates its outputs, as an ATen kernel does, instead of a Python binding around which the caller allocates,
// views and sums (a dozen dispatched operations per layer: host time, README "Benchmarks").
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BLK = 512;

inline float clampf(float v, float lim) { return std::min(std::max(v, -lim), lim); }

// out[i] = sum_k c[k] u[i]^k (k < nc, lowest order first), Horner's rule.
inline void horner(const float* u, const float* c, int nc, float* out, int64_t m) {
  const float top = c[nc - 1];
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) out[i] = top;
  for (int j = nc - 2; j >= 0; --j) {
    const float cj = c[j];
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) out[i] = out[i] * u[i] + cj;
  }
}

inline float sum(const float* a, int64_t m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < m; ++i) s += a[i];
  return s;
}

inline float dot(const float* a, const float* b, int64_t m) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < m; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) in single precision, vectorizable (Cody-Waite reduction, degree-6 polynomial; tests compare the layers with the eager path).
inline float exp_approx(float x) {
  x = clampf(x, 87.f);
  const float k = std::floor(x * 1.44269504f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// tanh(z) = sign(z) (1 - 2 / (exp(2|z|) + 1)); saturates to +-1.
inline float tanh_approx(float z) {
  const float t = 1.f - 2.f / (exp_approx(2.f * std::fabs(z)) + 1.f);
  return std::copysign(t, z);
}

// Guarded denominator: copysign(max(|d|, m), d).
inline float guard(float d, float m) { return std::copysign(std::max(std::fabs(d), m), d); }

inline void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), "harmony_cpu: ", name,
              " must be a contiguous float32 CPU tensor");
}

inline const float* opt(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// ---- HarmonyNorm ----------------------------------------------------------------------------------------

// y = w xhat + b + P(clamp(xhat)); returns (mean, rstd), each (B, C, 1). coef: (C, K) monomials or empty.
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                     const at::Tensor& coef, double eps, double limit, at::Tensor out) {
  check(x, "x");
  check(out, "out");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const int nc = coef.numel() ? static_cast<int>(coef.size(1)) : 0;
  auto mean = at::empty({B, C, 1}, x.options());
  auto rstd = at::empty({B, C, 1}, x.options());
  const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>(), *pb = b.data_ptr<float>(), *pc = opt(coef);
  float *py = out.data_ptr<float>(), *pm = mean.data_ptr<float>(), *pr = rstd.data_ptr<float>();
  const float lim = static_cast<float>(limit);
  at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
    float xh[BLK], u[BLK], p[BLK];
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row % C;
      const float* xr = px + row * N;
      float* yr = py + row * N;
      // one sweep for both moments, shifted by the first block's mean (no cancellation when |mean| >> std)
      const float shift = sum(xr, std::min(BLK, N)) / static_cast<float>(std::min(BLK, N));
      double s1 = 0.0, s2 = 0.0;
      for (int64_t i0 = 0; i0 < N; i0 += BLK) {
        const int64_t len = std::min(BLK, N - i0);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) xh[i] = xr[i0 + i] - shift;
        s1 += sum(xh, len);
        s2 += dot(xh, xh, len);
      }
      const double d = s1 / N;
      const float m = static_cast<float>(shift + d);
      const float rs = 1.f / std::sqrt(static_cast<float>(std::max(s2 / N - d * d, 0.0)) + static_cast<float>(eps));
      const float wc = pw[c], bc = pb[c];
      for (int64_t i0 = 0; i0 < N; i0 += BLK) {
        const int64_t len = std::min(BLK, N - i0);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) xh[i] = (xr[i0 + i] - m) * rs;
        if (nc) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) u[i] = clampf(xh[i], lim);
          horner(u, pc + c * nc, nc, p, len);
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) yr[i0 + i] = xh[i] * wc + bc + p[i];
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) yr[i0 + i] = xh[i] * wc + bc;
        }
      }
      pm[row] = m;
      pr[row] = rs;
    }
  });
  return {mean, rstd};
}

// dL/dx into grad_x; returns (dw, db) per (B, C) and, with dcoef (C, J) = P' coefficients, dcoef sums (B, C, J+1).
std::vector<at::Tensor> norm_backward(const at::Tensor& x, const at::Tensor& g, const at::Tensor& mean,
                                      const at::Tensor& rstd, const at::Tensor& w, const at::Tensor& dcoef,
                                      double limit, at::Tensor grad_x) {
  check(x, "x");
  check(g, "grad");
  check(grad_x, "grad_x");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const int nd = dcoef.numel() ? static_cast<int>(dcoef.size(1)) : 0;
  TORCH_CHECK(nd + 1 <= 8, "harmony_cpu: polynomial order ", nd, " above the supported 7");
  auto gw = at::empty({B, C}, x.options());
  auto gb = at::empty({B, C}, x.options());
  auto gc = nd ? at::empty({B, C, nd + 1}, x.options()) : at::empty({0}, x.options());
  const float *px = x.data_ptr<float>(), *pg = g.data_ptr<float>(), *pm = mean.data_ptr<float>(),
              *pr = rstd.data_ptr<float>(), *pw = w.data_ptr<float>(), *pd = opt(dcoef);
  float *pgx = grad_x.data_ptr<float>(), *pgw = gw.data_ptr<float>(), *pgb = gb.data_ptr<float>(),
        *pgc = nd ? gc.data_ptr<float>() : nullptr;
  const float lim = static_cast<float>(limit);
  at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
    float xh[BLK], u[BLK], p[BLK], s[BLK];
    double acc[8];
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row % C;
      const float *xr = px + row * N, *gr = pg + row * N;
      float* gxr = pgx + row * N;
      const float m = pm[row], rs = pr[row], wc = pw[c];
      double sb = 0, sw = 0, m1 = 0, m2 = 0;
      std::fill(acc, acc + 8, 0.0);
      for (int64_t i0 = 0; i0 < N; i0 += BLK) {  // sums; dL/dxhat parked in grad_x
        const int64_t len = std::min(BLK, N - i0);
        const float* gi = gr + i0;
        float* gxi = gxr + i0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) xh[i] = (xr[i0 + i] - m) * rs;
        sb += sum(gi, len);
        sw += dot(gi, xh, len);
        if (nd) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            u[i] = clampf(xh[i], lim);
            p[i] = gi[i];
          }
          acc[0] += sum(p, len);
          for (int k = 1; k <= nd; ++k) {
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) p[i] *= u[i];
            acc[k] += sum(p, len);
          }
          horner(u, pd + c * nd, nd, s, len);
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) gxi[i] = ((std::fabs(xh[i]) >= lim ? 0.f : s[i]) + wc) * gi[i];
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) gxi[i] = wc * gi[i];
        }
        m1 += sum(gxi, len);
        m2 += dot(gxi, xh, len);
      }
      const float a1 = static_cast<float>(m1 / N), a2 = static_cast<float>(m2 / N);
      for (int64_t i0 = 0; i0 < N; i0 += BLK) {  // dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
        const int64_t len = std::min(BLK, N - i0);
        float* gxi = gxr + i0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) gxi[i] = (gxi[i] - a1 - (xr[i0 + i] - m) * rs * a2) * rs;
      }
      pgw[row] = static_cast<float>(sw);
      pgb[row] = static_cast<float>(sb);
      for (int k = 0; k < nd + 1 && nd; ++k) pgc[row * (nd + 1) + k] = static_cast<float>(acc[k]);
    }
  });
  return {gw, gb, gc};
}

// ---- HarmonyRestore -------------------------------------------------------------------------------------

struct RestoreParams {
  const float *mu, *sigma, *w_eps, *b, *q, *r, *mix;
  int nc;  // coefficients of Q and R (orders 0..J), 0 without the polynomial
  float lim, min_den, bound;
};

// num = x - b - Q(u), den = guard(w + eps + R_b(u)) for one block; t = tanh(R / bound) (bound > 0).
inline void restore_terms(const RestoreParams& P, int64_t c, const float* x, int64_t len, float* u, float* num,
                          float* den, float* t, float* tmp) {
  const float bc = P.b[c], we = P.w_eps[c];
  if (!P.nc) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      num[i] = x[i] - bc;
      den[i] = guard(we, P.min_den);
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) u[i] = clampf(x[i], P.lim);
  horner(u, P.q + c * P.nc, P.nc, tmp, len);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) num[i] = x[i] - bc - tmp[i];
  horner(u, P.r + c * P.nc, P.nc, tmp, len);
  if (P.bound > 0) {
    const float inv = 1.f / P.bound;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      t[i] = tanh_approx(tmp[i] * inv);
      den[i] = guard(we + P.bound * t[i], P.min_den);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) den[i] = guard(we + tmp[i], P.min_den);
  }
}

RestoreParams restore_params(const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& w_eps,
                             const at::Tensor& b, const at::Tensor& q, const at::Tensor& r, const at::Tensor& mix,
                             double limit, double min_den, double bound) {
  for (const auto* t : {&mu, &sigma, &w_eps, &b}) check(*t, "parameter");
  return {mu.data_ptr<float>(), sigma.data_ptr<float>(), w_eps.data_ptr<float>(), b.data_ptr<float>(), opt(q),
          opt(r), opt(mix), q.numel() ? static_cast<int>(q.size(1)) : 0, static_cast<float>(limit),
          static_cast<float>(min_den), static_cast<float>(bound)};
}

// y = x + a (sigma num / den + mu - x), a = mix (y = sigma num / den + mu without it), into out.
void restore_forward(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& w_eps,
                     const at::Tensor& b, const at::Tensor& q, const at::Tensor& r, const at::Tensor& mix,
                     double limit, double min_den, double bound, at::Tensor out) {
  check(x, "x");
  check(out, "out");
  const int64_t C = x.size(1), N = x.size(2);
  const RestoreParams P = restore_params(mu, sigma, w_eps, b, q, r, mix, limit, min_den, bound);
  const float* px = x.data_ptr<float>();
  float* py = out.data_ptr<float>();
  at::parallel_for(0, x.size(0) * C, 1, [&](int64_t r0, int64_t r1) {
    float u[BLK], num[BLK], den[BLK], t[BLK], tmp[BLK];
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row % C;
      const float sg = P.sigma[row], mc = P.mu[row], a = P.mix ? P.mix[c] : 1.f;
      for (int64_t i0 = 0; i0 < N; i0 += BLK) {
        const int64_t len = std::min(BLK, N - i0);
        const float* xi = px + row * N + i0;
        float* yi = py + row * N + i0;
        restore_terms(P, c, xi, len, u, num, den, t, tmp);
        if (P.mix) {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) yi[i] = xi[i] + a * (sg * num[i] / den[i] + mc - xi[i]);
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) yi[i] = sg * num[i] / den[i] + mc;
        }
      }
    }
  });
}

// dL/dx into grad_x; returns (dmu, dsigma, dw, db) per (B, C), (dgamma, ddelta) per (B, C, J+1) or empty,
// dmix per (B, C) or empty.
std::vector<at::Tensor> restore_backward(const at::Tensor& x, const at::Tensor& g, const at::Tensor& mu,
                                         const at::Tensor& sigma, const at::Tensor& w_eps, const at::Tensor& b,
                                         const at::Tensor& q, const at::Tensor& r, const at::Tensor& mix,
                                         double limit, double min_den, double bound, at::Tensor grad_x) {
  check(x, "x");
  check(g, "grad");
  check(grad_x, "grad_x");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  const RestoreParams P = restore_params(mu, sigma, w_eps, b, q, r, mix, limit, min_den, bound);
  const int nc = P.nc;
  TORCH_CHECK(nc <= 8, "harmony_cpu: polynomial order ", nc - 1, " above the supported 7");
  auto opts = x.options();
  auto gmu = at::empty({B, C}, opts), gsig = at::empty({B, C}, opts), gw = at::empty({B, C}, opts),
       gb = at::empty({B, C}, opts);
  auto ggam = nc ? at::empty({B, C, nc}, opts) : at::empty({0}, opts);
  auto gdel = nc ? at::empty({B, C, nc}, opts) : at::empty({0}, opts);
  auto gmix = P.mix ? at::empty({B, C}, opts) : at::empty({0}, opts);
  // derivative coefficients: Q'(u), R'(u) (orders 0..J-1)
  std::vector<float> dq(std::max<int64_t>(C * (nc - 1), 1)), dr(dq.size());
  for (int64_t c = 0; c < C && nc > 1; ++c)
    for (int k = 1; k < nc; ++k) {
      dq[c * (nc - 1) + k - 1] = k * P.q[c * nc + k];
      dr[c * (nc - 1) + k - 1] = k * P.r[c * nc + k];
    }
  const float *px = x.data_ptr<float>(), *pg = g.data_ptr<float>();
  float* pgx = grad_x.data_ptr<float>();
  at::parallel_for(0, B * C, 1, [&](int64_t r0, int64_t r1) {
    float u[BLK], num[BLK], den[BLK], t[BLK], tmp[BLK], e[BLK], f[BLK], p[BLK], s[BLK];
    double ag[8], ad[8];
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row % C;
      const float sg = P.sigma[row], a = P.mix ? P.mix[c] : 1.f, keep = 1.f - a, scale = sg * a;
      double s_mu = 0, s_sig = 0, s_w = 0, s_b = 0, s_xg = 0;
      std::fill(ag, ag + 8, 0.0);
      std::fill(ad, ad + 8, 0.0);
      for (int64_t i0 = 0; i0 < N; i0 += BLK) {
        const int64_t len = std::min(BLK, N - i0);
        const float *xi = px + row * N + i0, *gi = pg + row * N + i0;
        float* gxi = pgx + row * N + i0;
        restore_terms(P, c, xi, len, u, num, den, t, tmp);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const float ratio = num[i] / den[i];
          e[i] = gi[i] * scale / den[i];  // dL/dnum
          f[i] = -e[i] * ratio;           // dL/dden, straight through the floor
          num[i] = ratio;
        }
        s_mu += sum(gi, len);
        s_sig += dot(gi, num, len);
        s_w += sum(f, len);
        s_b -= sum(e, len);
        if (P.mix) s_xg += dot(gi, xi, len);
        if (nc) {
          if (P.bound > 0) {
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) f[i] *= 1.f - t[i] * t[i];  // dL/dR
          }
          ag[0] -= sum(e, len);
          ad[0] += sum(f, len);
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            p[i] = e[i];
            tmp[i] = f[i];
          }
          for (int k = 1; k < nc; ++k) {
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) {
              p[i] *= u[i];
              tmp[i] *= u[i];
            }
            ag[k] -= sum(p, len);
            ad[k] += sum(tmp, len);
          }
          // dy/dx = e (1 - Q'(u)) + dL/dR R'(u), the polynomial slopes 0 where x is clamped
          if (nc > 1) {
            horner(u, dr.data() + c * (nc - 1), nc - 1, s, len);
            horner(u, dq.data() + c * (nc - 1), nc - 1, p, len);
          } else {
            std::fill(s, s + len, 0.f);
            std::fill(p, p + len, 0.f);
          }
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            const float slope = std::fabs(xi[i]) >= P.lim ? 0.f : s[i] * f[i] - p[i] * e[i];
            gxi[i] = e[i] + slope + keep * gi[i];
          }
        } else {
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) gxi[i] = e[i] + keep * gi[i];
        }
      }
      if (P.mix) {
        gmix.data_ptr<float>()[row] = static_cast<float>(sg * s_sig + P.mu[row] * s_mu - s_xg);
        s_mu *= a;
        s_sig *= a;
      }
      gmu.data_ptr<float>()[row] = static_cast<float>(s_mu);
      gsig.data_ptr<float>()[row] = static_cast<float>(s_sig);
      gw.data_ptr<float>()[row] = static_cast<float>(s_w);
      gb.data_ptr<float>()[row] = static_cast<float>(s_b);
      for (int k = 0; k < nc; ++k) {
        ggam.data_ptr<float>()[row * nc + k] = static_cast<float>(ag[k]);
        gdel.data_ptr<float>()[row * nc + k] = static_cast<float>(ad[k]);
      }
    }
  });
  return {gmu, gsig, gw, gb, ggam, gdel, gmix};
}

// ---- operator entry points: any (B, C, ...) shape, outputs allocated here ----------------------------------

// contiguous fp32 (B, C, N) view of a (B, C, ...) activation
at::Tensor rows3(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "harmony_cpu: expected a (B, C, ...) tensor, got ", x.dim(), " dimensions");
  const int64_t B = x.size(0), C = x.size(1);
  return x.contiguous().view({B, C, B * C ? x.numel() / (B * C) : 0});
}

// per-channel parameter (C,) or (C, 1) as a flat contiguous fp32 vector
at::Tensor flat(const at::Tensor& t) { return t.to(at::kFloat).contiguous().view({-1}); }

// an optional tensor as contiguous fp32, an empty one standing for None
at::Tensor opt_f32(const std::optional<at::Tensor>& t, const at::Tensor& like) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::empty({0}, like.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> op_norm_forward(const at::Tensor& x, const at::Tensor& w,
                                                               const at::Tensor& b,
                                                               const std::optional<at::Tensor>& coef, double eps,
                                                               double limit) {
  auto x3 = rows3(x);
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto stats = norm_forward(x3, flat(w), flat(b), opt_f32(coef, x), eps, limit, out.view(x3.sizes()));
  return {out, stats[0], stats[1]};
}

// (grad_x, dw (C,), db (C,), dcoef (C, J+1) or empty): the parameters' gradients summed over the batch
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> op_norm_backward(
    const at::Tensor& x, const at::Tensor& g, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& w,
    const std::optional<at::Tensor>& dcoef, double limit) {
  auto x3 = rows3(x);
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto r = norm_backward(x3, rows3(g), mean.to(at::kFloat).contiguous(), rstd.to(at::kFloat).contiguous(), flat(w),
                         opt_f32(dcoef, x), limit, grad_x.view(x3.sizes()));
  return {grad_x, r[0].sum(0), r[1].sum(0), r[2].numel() ? r[2].sum(0) : r[2]};
}

at::Tensor op_restore_forward(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& sigma,
                              const at::Tensor& w_eps, const at::Tensor& b, const std::optional<at::Tensor>& q,
                              const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& mix, double limit,
                              double min_den, double bound) {
  auto x3 = rows3(x);
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  restore_forward(x3, mu.to(at::kFloat).contiguous(), sigma.to(at::kFloat).contiguous(), flat(w_eps), flat(b),
                  opt_f32(q, x), opt_f32(r, x), opt_f32(mix, x), limit, min_den, bound, out.view(x3.sizes()));
  return out;
}

// (grad_x, dmu (B, C), dsigma (B, C), dw (C,), db (C,), dgamma (C, J+1), ddelta (C, J+1), dmix (C,)); the
// parameters' gradients summed over the batch, empty where the layer has no polynomial or mix
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
op_restore_backward(const at::Tensor& x, const at::Tensor& g, const at::Tensor& mu, const at::Tensor& sigma,
                    const at::Tensor& w_eps, const at::Tensor& b, const std::optional<at::Tensor>& q,
                    const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& mix, double limit,
                    double min_den, double bound) {
  auto x3 = rows3(x);
  auto grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  auto o = restore_backward(x3, rows3(g), mu.to(at::kFloat).contiguous(), sigma.to(at::kFloat).contiguous(),
                            flat(w_eps), flat(b), opt_f32(q, x), opt_f32(r, x), opt_f32(mix, x), limit, min_den, bound,
                            grad_x.view(x3.sizes()));
  auto per_channel = [](const at::Tensor& t) { return t.numel() ? t.sum(0) : t; };
  return {grad_x, o[0], o[1], per_channel(o[2]), per_channel(o[3]), per_channel(o[4]), per_channel(o[5]),
          per_channel(o[6])};
}

}  // namespace

TORCH_LIBRARY(nnunet_universal_harmony, m) {
  m.def("norm_forward(Tensor x, Tensor w, Tensor b, Tensor? coef, float eps, float limit) -> (Tensor, Tensor, Tensor)");
  m.def("norm_backward(Tensor x, Tensor g, Tensor mean, Tensor rstd, Tensor w, Tensor? dcoef, float limit) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("restore_forward(Tensor x, Tensor mu, Tensor sigma, Tensor w_eps, Tensor b, Tensor? q, Tensor? r, "
        "Tensor? mix, float limit, float min_den, float bound) -> Tensor");
  m.def("restore_backward(Tensor x, Tensor g, Tensor mu, Tensor sigma, Tensor w_eps, Tensor b, Tensor? q, "
        "Tensor? r, Tensor? mix, float limit, float min_den, float bound) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nnunet_universal_harmony, CPU, m) {
  m.impl("norm_forward", &op_norm_forward);
  m.impl("norm_backward", &op_norm_backward);
  m.impl("restore_forward", &op_restore_forward);
  m.impl("restore_backward", &op_restore_backward);
}
