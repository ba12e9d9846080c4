/* Fused Adam-mini update for one contiguous slice of a parameter, on the CPU.
 *
 * Each block is visited once: the squared-gradient sum is taken while the block's
 * gradient is still in cache, then m and p are updated in the same sweep. That is five
 * passes over memory (read g, m, p; write m, p) against fused AdamW's seven.
 *
 * The slice holds n elements and starts `offset` elements into its first block. The
 * first and last blocks may be cut by a shard boundary; their full sums of squares,
 * already reduced across ranks, come in as first_sq / last_sq (NaN: compute locally).
 */
#include <math.h>
#include <stdint.h>

#define DEFINE_ADAM_MINI_UPDATE(NAME, T)                                                     \
void NAME(T *p, const T *g, T *m, T *v, int64_t n, int64_t block_numel, int64_t offset,     \
          double first_sq, double last_sq, double beta1, double beta2, double eps,          \
          double lr, double weight_decay, double bias_correction1,                          \
          double bias_correction2_sqrt, int num_threads) {                                  \
    const int64_t num_blocks = (offset + n + block_numel - 1) / block_numel;                \
    const T one_minus_beta1 = (T)(1.0 - beta1);                                             \
    const T decay = (T)(1.0 - lr * weight_decay);                                           \
    _Pragma("omp parallel for schedule(static) num_threads(num_threads) if(n > 65536)")     \
    for (int64_t b = 0; b < num_blocks; ++b) {                                              \
        int64_t lo = b * block_numel - offset;                                              \
        int64_t hi = lo + block_numel;                                                      \
        if (lo < 0) lo = 0;                                                                 \
        if (hi > n) hi = n;                                                                 \
        double sq;                                                                          \
        if (b == 0 && !isnan(first_sq)) {                                                   \
            sq = first_sq;                                                                  \
        } else if (b == num_blocks - 1 && !isnan(last_sq)) {                                \
            sq = last_sq;                                                                   \
        } else {                                                                            \
            double acc = 0.0;                                                               \
            _Pragma("omp simd reduction(+:acc)")                                            \
            for (int64_t i = lo; i < hi; ++i) acc += (double)g[i] * (double)g[i];           \
            sq = acc;                                                                       \
        }                                                                                   \
        const T vb = (T)(beta2 * (double)v[b] + (1.0 - beta2) * (sq / (double)block_numel)); \
        v[b] = vb;                                                                          \
        const T denom = (T)(sqrt((double)vb) / bias_correction2_sqrt + eps);                \
        const T step = (T)(lr / bias_correction1) / denom;                                  \
        _Pragma("omp simd")                                                                 \
        for (int64_t i = lo; i < hi; ++i) {                                                 \
            const T mi = m[i] + one_minus_beta1 * (g[i] - m[i]);                            \
            m[i] = mi;                                                                      \
            p[i] = p[i] * decay - step * mi;                                                \
        }                                                                                   \
    }                                                                                       \
}

DEFINE_ADAM_MINI_UPDATE(adam_mini_update_f32, float)
DEFINE_ADAM_MINI_UPDATE(adam_mini_update_f64, double)
