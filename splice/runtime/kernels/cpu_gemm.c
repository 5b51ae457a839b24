/* splice's CPU GEMM: C[M,N] = A[M,K] · B, fp32, B packed at load time.
 *
 * One source for every CPU target: the vector width and the register tile are compile-time
 * constants derived from the Target (splice/runtime/kernels/tvm_gemm.py: gemm_plan), and
 * GCC's generic vector extension maps `vf` to AVX2 (8 lanes), AVX-512 (16) or NEON (4)
 * registers according to -march/-mcpu. The structure is BLIS's (Van Zee & van de Geijn,
 * "BLIS: A Framework for Rapidly Instantiating BLAS Functionality", TOMS 2015; Low et al.,
 * "Analytical Modeling Is Enough for High-Performance BLIS", TOMS 2016):
 *
 *   for each KC-deep slice of K                       (B micro-panel KC×NR stays in L1)
 *     for each MC-row block of A: pack it [MC/MR][KC][MR]   (A block stays in L2)
 *       for each NR-wide panel of B owned by this task
 *         for each MR-row micro-panel: the micro-kernel keeps an MR×NR tile of C in
 *         MR·NR/L vector registers over the KC loop (one broadcast of A and NR/L loads of
 *         B per MR·NR/L FMAs), then adds it to C (stores it on the first slice).
 *
 * B arrives packed as [ceil(N/NR)][K][NR], zero-padded (a Relax transform of the weight
 * that LiftTransformParams runs once at load time). A task owns a rectangle of panels ×
 * rows; TIR runs the tasks in a parallel loop on TVM's thread pool, each with its own slice
 * of the `work` buffer for packed A.
 *
 * Macros (all required): SPLICE_FN (the symbol), SPLICE_L (fp32 lanes per vector),
 * SPLICE_MR, SPLICE_NR (a multiple of SPLICE_L), SPLICE_KC, SPLICE_MC (a multiple of MR).
 */
#include <stdint.h>

#define NV (SPLICE_NR / SPLICE_L)

typedef float vf __attribute__((vector_size(SPLICE_L * 4), aligned(4), may_alias));

/* c[MR][ldc] (+)= ap[kc][MR] · bp[kc][NR] */
static inline __attribute__((always_inline)) void micro_kernel(
    int kc, const float *restrict ap, const float *restrict bp, float *restrict c, int64_t ldc,
    int accumulate) {
  vf acc[SPLICE_MR][NV];
#pragma GCC unroll 32
  for (int i = 0; i < SPLICE_MR; i++)
#pragma GCC unroll 8
    for (int j = 0; j < NV; j++) acc[i][j] = (vf){0};
  for (int k = 0; k < kc; k++) {
    vf b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; j++) b[j] = *(const vf *)(bp + k * SPLICE_NR + j * SPLICE_L);
#pragma GCC unroll 32
    for (int i = 0; i < SPLICE_MR; i++) {
      float a = ap[k * SPLICE_MR + i];
#pragma GCC unroll 8
      for (int j = 0; j < NV; j++) acc[i][j] += b[j] * a;
    }
  }
  if (accumulate) {
#pragma GCC unroll 32
    for (int i = 0; i < SPLICE_MR; i++)
#pragma GCC unroll 8
      for (int j = 0; j < NV; j++) *(vf *)(c + i * ldc + j * SPLICE_L) += acc[i][j];
  } else {
#pragma GCC unroll 32
    for (int i = 0; i < SPLICE_MR; i++)
#pragma GCC unroll 8
      for (int j = 0; j < NV; j++) *(vf *)(c + i * ldc + j * SPLICE_L) = acc[i][j];
  }
}

static int64_t part(int64_t n, int64_t i, int64_t parts) { return n * i / parts; }

int32_t SPLICE_FN(const float *A, const float *Bp, float *C, float *work, int32_t M, int32_t N,
                  int32_t K, int32_t task, int32_t ntasks) {
  const int64_t npanels = (N + SPLICE_NR - 1) / SPLICE_NR;
  const int64_t nrowblk = (M + SPLICE_MR - 1) / SPLICE_MR;
  /* the task grid: panels first (each task reads only its own panels of B), then rows */
  int64_t tp = ntasks < npanels ? ntasks : npanels;
  int64_t tm = ntasks / tp;
  if (tm > nrowblk) tm = nrowblk;
  if (task >= tp * tm) return 0;
  const int64_t p0 = part(npanels, task % tp, tp), p1 = part(npanels, task % tp + 1, tp);
  const int64_t r0 = part(nrowblk, task / tp, tm) * SPLICE_MR;
  const int64_t r1 = part(nrowblk, task / tp + 1, tm) * SPLICE_MR;
  const int64_t rend = r1 < M ? r1 : M;
  float *apack = work + (int64_t)task * SPLICE_MC * SPLICE_KC;
  float ctile[SPLICE_MR * SPLICE_NR] __attribute__((aligned(64)));
  for (int64_t k0 = 0; k0 < K; k0 += SPLICE_KC) {
    const int kc = K - k0 < SPLICE_KC ? (int)(K - k0) : SPLICE_KC;
    const int first = k0 == 0;
    for (int64_t m0 = r0; m0 < rend; m0 += SPLICE_MC) {
      const int64_t mc = rend - m0 < SPLICE_MC ? rend - m0 : SPLICE_MC;
      const int64_t nblk = (mc + SPLICE_MR - 1) / SPLICE_MR;
      for (int64_t ib = 0; ib < nblk; ib++) { /* pack A[m0.., k0..k0+kc) */
        float *dst = apack + ib * kc * SPLICE_MR;
        for (int i = 0; i < SPLICE_MR; i++) {
          const int64_t r = m0 + ib * SPLICE_MR + i;
          const float *src = A + r * K + k0;
          if (r < rend)
            for (int k = 0; k < kc; k++) dst[k * SPLICE_MR + i] = src[k];
          else
            for (int k = 0; k < kc; k++) dst[k * SPLICE_MR + i] = 0.0f;
        }
      }
      for (int64_t p = p0; p < p1; p++) {
        const float *bp = Bp + (p * K + k0) * SPLICE_NR;
        const int64_t n0 = p * SPLICE_NR;
        const int64_t nr = N - n0 < SPLICE_NR ? N - n0 : SPLICE_NR;
        for (int64_t ib = 0; ib < nblk; ib++) {
          const int64_t row = m0 + ib * SPLICE_MR;
          const int64_t mr = rend - row < SPLICE_MR ? rend - row : SPLICE_MR;
          float *c = C + row * N + n0;
          const float *ap = apack + ib * kc * SPLICE_MR;
          if (mr == SPLICE_MR && nr == SPLICE_NR) {
            micro_kernel(kc, ap, bp, c, N, !first);
          } else { /* an edge tile: computed in a buffer, the valid part added to C */
            micro_kernel(kc, ap, bp, ctile, SPLICE_NR, 0);
            for (int64_t i = 0; i < mr; i++)
              for (int64_t j = 0; j < nr; j++)
                c[i * N + j] = first ? ctile[i * SPLICE_NR + j] : c[i * N + j] + ctile[i * SPLICE_NR + j];
          }
        }
      }
    }
  }
  return 0;
}
