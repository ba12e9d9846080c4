/* Fused Adam-mini update for one contiguous slice of a parameter, on the CPU.
 *
 * Five passes over memory (read g, m, p; write m, p) against fused AdamW's seven: a block's
 * squared-gradient sum must be known before any of its elements is updated, so the sweep is
 * software-pipelined: while block b is updated, the squares of block b + 1 are summed in
 * the same loop. Every load stream is then in flight at once, and block b + 1's gradient
 * is still in cache when its own update comes.
 *
 * The slice holds n elements and starts `offset` elements into its first block. The
 * first and last blocks may be cut by a shard boundary; their full sums of squares,
 * already reduced across ranks, come in as first_sq / last_sq (NaN: compute locally).
 * Squares are summed in the element type: the vectorised reduction keeps one partial sum
 * per lane, accurate enough for a second-moment estimate and faster than widening.
 * The tensors never overlap (restrict), which lets the loops vectorise without checks.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define DEFINE_ADAM_MINI_UPDATE(NAME, T)                                                       \
static T NAME##_sum_sq(const T *restrict g, int64_t lo, int64_t hi) {                         \
    T acc = 0;                                                                                \
    _Pragma("omp simd reduction(+:acc)")                                                      \
    for (int64_t i = lo; i < hi; ++i) acc += g[i] * g[i];                                     \
    return acc;                                                                               \
}                                                                                             \
                                                                                              \
void NAME(T *restrict p, const T *restrict g, T *restrict m, T *restrict v, int64_t n,       \
          int64_t block_numel, int64_t offset, double first_sq, double last_sq, double beta1, \
          double beta2, double eps, double lr, double weight_decay, double bias_correction1,  \
          double bias_correction2_sqrt, int num_threads) {                                    \
    const int64_t num_blocks = (offset + n + block_numel - 1) / block_numel;                  \
    const T one_minus_beta1 = (T)(1.0 - beta1);                                               \
    const T decay = (T)(1.0 - lr * weight_decay);                                             \
    _Pragma("omp parallel num_threads(num_threads) if(n > 65536)")                            \
    {                                                                                         \
        const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();         \
        const int64_t per_thread = (num_blocks + threads - 1) / threads;                      \
        const int64_t b_begin = thread * per_thread;                                          \
        const int64_t b_end = b_begin + per_thread < num_blocks ? b_begin + per_thread : num_blocks; \
        T sq = 0;                                                                             \
        if (b_begin < b_end) {                                                                \
            int64_t lo = b_begin * block_numel - offset, hi = lo + block_numel;               \
            sq = NAME##_sum_sq(g, lo < 0 ? 0 : lo, hi > n ? n : hi);                          \
        }                                                                                     \
        for (int64_t b = b_begin; b < b_end; ++b) {                                           \
            int64_t lo = b * block_numel - offset, hi = lo + block_numel;                     \
            if (lo < 0) lo = 0;                                                               \
            if (hi > n) hi = n;                                                               \
            double block_sq = (double)sq;                                                     \
            if (b == 0 && !isnan(first_sq)) block_sq = first_sq;                              \
            if (b == num_blocks - 1 && !isnan(last_sq)) block_sq = last_sq;                   \
            const T vb = (T)(beta2 * (double)v[b] + (1.0 - beta2) * (block_sq / (double)block_numel)); \
            v[b] = vb;                                                                        \
            const T step = (T)(lr / bias_correction1) / (T)(sqrt((double)vb) / bias_correction2_sqrt + eps); \
            const int64_t next_lo = hi, next_hi = hi + block_numel;                           \
            T next_sq = 0;                                                                    \
            if (b + 1 < b_end && next_hi <= n && next_hi - next_lo == hi - lo) {              \
                /* Pipelined: update block b, sum squares of block b + 1. */                  \
                const T *restrict g_next = g + block_numel;                                   \
                _Pragma("omp simd reduction(+:next_sq)")                                      \
                for (int64_t i = lo; i < hi; ++i) {                                           \
                    const T mi = m[i] + one_minus_beta1 * (g[i] - m[i]);                      \
                    m[i] = mi;                                                                \
                    p[i] = p[i] * decay - step * mi;                                          \
                    next_sq += g_next[i] * g_next[i];                                         \
                }                                                                             \
            } else {                                                                          \
                _Pragma("omp simd")                                                           \
                for (int64_t i = lo; i < hi; ++i) {                                           \
                    const T mi = m[i] + one_minus_beta1 * (g[i] - m[i]);                      \
                    m[i] = mi;                                                                \
                    p[i] = p[i] * decay - step * mi;                                          \
                }                                                                             \
                if (b + 1 < b_end)                                                            \
                    next_sq = NAME##_sum_sq(g, next_lo, next_hi > n ? n : next_hi);           \
            }                                                                                 \
            sq = next_sq;                                                                     \
        }                                                                                     \
    }                                                                                         \
}

DEFINE_ADAM_MINI_UPDATE(adam_mini_update_f32, float)
DEFINE_ADAM_MINI_UPDATE(adam_mini_update_f64, double)
