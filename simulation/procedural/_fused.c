/* The procedural renderer's two per-pixel passes, fused into one loop each.
 *
 * The same maths as simulation/procedural/kernels.py (background + albedo + the
 * appearance textures, then shade + sky), written once per pixel instead of one
 * tensor pass per operation, with early exits: sky rows skip the ground, pixels no
 * frontage hits skip the facade work, non-sky pixels skip the sky. Frames are
 * independent, so OpenMP splits a batch by frame and the output does not depend on
 * the thread count. Every product is written in the order kernels.py evaluates it,
 * in float32; the remaining differences are the last bits of sinf/expf/log2f against
 * torch's vectorized versions (tests/test_fused.py bounds them).
 *
 * Loaded with ctypes (simulation/procedural/fused.py), which releases the GIL during
 * the call; the module init below only lets setuptools build it as an extension.
 * Compile with -ffp-contract=off (a fused multiply-add would round differently) and
 * never with -ffast-math (it would fold the rounding tricks below).
 *
 * Shapes: n frames of h x w pixels; per-frame scalars in `frame` (FRAME_COLS each);
 * rays dx (n, w), yw and zw (n, h); buffers (n, h, w) and albedo (n, h, w, 3);
 * the image (n, 3, h, w).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define FAR 1.0e4f
#define NUM_BLOCKS 16
#define NUM_MATERIALS 16
#define TILE 256 /* value noise and texture tiles: TILE x TILE, a power of two */
#define MASK (TILE - 1)
#define STREAK_H 256
#define STREAK_W 512

enum { M_SKY, M_ROAD, M_MARK, M_SIDEWALK, M_TERRAIN, M_FENCE, M_WINDOW, M_BUILDING };
#define M_VEG 13
enum { S_SKY, S_GROUND, S_LEFT, S_RIGHT, S_UPRIGHT };
enum { BUILDING = 1, TREES = 2 };

/* Columns of `frame`: the order fused.FRAME_COLUMNS names. */
enum {
    F_CAM_H, F_C0, F_TY, F_A, F_DASH, F_LE, F_RE, F_SW, F_LW, F_LANES,
    F_FRONT_L, F_FRONT_R, F_BLEN, F_PHASE_L, F_PHASE_R, F_TEX_U, F_TEX_V,
    F_WET, F_DEPOSITS, F_FOCAL, F_STRENGTH, F_SCALE, F_OFF_A, F_OFF_B, FRAME_COLS
};
/* Columns of `wx`: kernels.WEATHER_COLUMNS. */
enum {
    W_CLOUD, W_PRECIP, W_SUN_AZ, W_SUN_ALT, W_FOG_DENSITY, W_FOG_DIST, W_FOG_FALLOFF,
    W_SCATTER, W_MIE, W_RAYLEIGH, W_DUST, W_WIND, W_WETNESS, W_DEPOSITS, WX_COLS
};

static inline float clampf(float x, float lo, float hi) { /* two selects: vectorizable */
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}
static inline float maxf(float x, float lo) { return x < lo ? lo : x; }
static inline float minf(float x, float hi) { return x > hi ? hi : x; }

/* floor, truncation and round-half-to-even without a libm call (baseline x86-64 has
 * no rounding instruction); exact for |x| < 2^22, and beyond that (where every float
 * is whole, or a cast would overflow) the libm function. */
#define EXACT_INT 4194304.0f
static inline float floor_fast(float x) {
    if (!(fabsf(x) < EXACT_INT)) return floorf(x);
    const float t = (float)(int)x;
    return t > x ? t - 1.0f : t;
}
static inline float trunc_fast(float x) {
    return fabsf(x) < EXACT_INT ? (float)(int)x : truncf(x);
}
static inline float rint_fast(float x) { /* the default rounding mode: half to even */
    if (!(fabsf(x) < EXACT_INT)) return rintf(x);
    return (x + 12582912.0f) - 12582912.0f; /* 1.5 * 2^23; not folded without fast-math */
}

/* torch.remainder on floats for a divisor b > 0: the remainder in [0, b). fmodf's
 * result, computed in double: the quotient's truncation is corrected where rounding
 * moved it, and the product and difference are exact for |a / b| < 2^29, so the value
 * equals fmodf's (up to the sign of a zero, which only meets comparisons here).
 * glibc's fmodf is several times slower. */
static inline float pymodf(float a, float b) {
    const double bd = b, qa = (double)a / bd;
    const double q = fabs(qa) < 4.0e15 ? (double)(int64_t)qa : trunc(qa);
    double m = (double)a - q * bd;
    if (a >= 0.0f) {
        if (m < 0.0) m += bd;
        else if (m >= bd) m -= bd;
    } else {
        if (m > 0.0) m -= bd;
        else if (m <= -bd) m += bd;
    }
    if (m < 0.0) m += bd; /* the divisor's sign, as torch.remainder */
    return (float)m;
}

/* tensor.long() (truncation) followed by "% TILE" (non-negative, TILE a power of 2). */
static inline int wrap(float x) { return (int)((int64_t)x & MASK); }

static inline float smoothstep(float e0, float e1, float x) {
    float t = clampf((x - e0) / (e1 - e0), 0.0f, 1.0f);
    return t * t * (3.0f - 2.0f * t);
}

/* kernels.plane_depth: the smallest positive root of a z^2 - q z + cc = 0, or FAR. */
static inline float plane_depth(float a, float q, float cc) {
    float disc = q * q - 4.0f * a * cc;
    float z = 2.0f * cc / (q + sqrtf(maxf(disc, 0.0f)));
    return (disc >= 0.0f && q > 0.0f && z > 0.05f) ? z : FAR;
}

static int threads_or_one(int threads) { return threads > 0 ? threads : 1; }

/* Runtime ISA dispatch. Some passes are written as per-frame bodies (always inlined)
 * that GCC and Clang compile three times: for baseline x86-64, for AVX2 and for
 * AVX-512, where their loops vectorize. The widest the CPU has is chosen at run time
 * (s2r_isa). Every variant performs the same IEEE float operations in the same order
 * (no contraction into FMA: -ffp-contract=off; no approximate reciprocals), so all
 * three write the same bytes; tests/test_fused.py checks it. */
#if defined(__GNUC__) || defined(__clang__)
#define S2R_INLINE static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define S2R_INLINE static __forceinline
#define restrict __restrict
#else
#define S2R_INLINE static inline
#endif
#if defined(__GNUC__) && !defined(__clang__) /* GCC would vectorize it into gathers */
#define S2R_SCALAR static __attribute__((noinline, optimize("no-tree-vectorize")))
#else
#define S2R_SCALAR static
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(S2R_NO_DISPATCH)
#define S2R_DISPATCH 1
#define S2R_BODY S2R_INLINE
#define S2R_AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt,sse4.2")))
#define S2R_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,bmi,bmi2,popcnt,sse4.2")))
#else
#define S2R_BODY S2R_INLINE
#endif

static int isa_cap = 2; /* 0 baseline, 1 AVX2, 2 AVX-512: the widest allowed */

/* The variant the passes run (0 baseline, 1 AVX2, 2 AVX-512): the widest this CPU has,
 * at most `cap` (cap < 0 leaves the limit as it is). */
int s2r_isa(int cap) {
    int have = 0;
    if (cap >= 0) isa_cap = cap;
#ifdef S2R_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) have = 1;
    if (have && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        have = 2;
#endif
    return have < isa_cap ? have : isa_cap;
}

/* Three compiled copies of the body NAME##_body: NAME##_0, _1 and _2. Kept apart (not
 * inlined), so that the restrict qualifiers of their arguments hold for the vectorizer. */
#ifdef S2R_DISPATCH
#define S2R_VARIANTS(NAME, PARAMS, ARGS)                                            \
    static __attribute__((noinline)) void NAME##_0 PARAMS { NAME##_body ARGS; }          \
    S2R_AVX2 static __attribute__((noinline)) void NAME##_1 PARAMS { NAME##_body ARGS; } \
    S2R_AVX512 static __attribute__((noinline)) void NAME##_2 PARAMS { NAME##_body ARGS; }
#define S2R_PICK(NAME, LEVEL) ((LEVEL) == 2 ? NAME##_2 : ((LEVEL) == 1 ? NAME##_1 : NAME##_0))
#else
#define S2R_VARIANTS(NAME, PARAMS, ARGS) static void NAME##_0 PARAMS { NAME##_body ARGS; }
#define S2R_PICK(NAME, LEVEL) ((void)(LEVEL), NAME##_0)
#endif

/* rintf (half to even) and floorf, exact for every float and branch-free, so that
 * loops using them vectorize: |x| < 2^22 rounds by adding 1.5 * 2^23, 2^22 <= |x| <
 * 2^23 by adding 2^23 with x's sign, and larger floats are whole already. The sign of
 * a zero result may differ from libm's; it only meets comparisons and conversions. */
static inline float rint_vec(float x) {
    const float small = (x + 12582912.0f) - 12582912.0f;
    const float s = x < 0.0f ? -8388608.0f : 8388608.0f;
    const float mid = (x + s) - s;
    const float m = fabsf(x);
    const float r = m < 8388608.0f ? mid : x;
    return m < EXACT_INT ? small : r;
}
static inline float floor_vec(float x) {
    const float r = rint_vec(x);
    return r > x ? r - 1.0f : r;
}

/* kernels.plane_depth without branches (for the vectorized frontage rows). */
static inline float plane_depth_vec(float a, float q, float cc) {
    const float disc = q * q - 4.0f * a * cc;
    const float z = 2.0f * cc / (q + sqrtf(maxf(disc, 0.0f)));
    return ((disc >= 0.0f) & (q > 0.0f) & (z > 0.05f)) ? z : FAR;
}

/* The arguments of s2r_surfaces, for its per-frame body. */
typedef struct {
    int h, w, levels, appearance;
    const float *dx, *yw, *zw, *frame, *top, *palette, *noise, *tiles, *tints;
    const int32_t *kind, *color, *classes, *family;
    float texture;
    float *depth, *height, *emissive, *albedo;
    uint8_t *label, *surface, *puddle;
} SurfArgs;

/* Row buffers of one frame of s2r_surfaces: 8 float and 6 int32 rows of w. */
typedef struct {
    float *dep, *hgt, *tu, *tv, *em, *fz, *fy, *ftp;
    int32_t *lab, *mat, *surf, *fk, *fcol, *fbi;
} SurfRows;

/* A ground row (kernels.background): road, markings, sidewalk, terrain. */
S2R_INLINE void ground_row(
    int w, const float *restrict dx, float t, float centre, float le, float re, float walk_l,
    float walk_r, float lw, float last_line, int dashed, float zg, int road, int sidewalk,
    int terrain, float *restrict dep, float *restrict hgt, float *restrict tu,
    float *restrict tv, int32_t *restrict lab, int32_t *restrict mat, int32_t *restrict surf) {
    for (int c = 0; c < w; c++) {
        const float e = t * dx[c] - centre;
        const int on_road = (e >= le) & (e <= re);
        const int on_walk = ((e >= walk_l) & (e < le)) | ((e > re) & (e <= walk_r));
        const float frac = (e - le) / lw;
        const float nearest = rint_vec(frac); /* half to even, as torch.round */
        int line = (fabsf(frac - nearest) * lw < 0.075f) & (nearest >= 1.0f) &
                   (nearest <= last_line) & dashed;
        line = line | (fabsf(e - le) < 0.1f) | (fabsf(e - re) < 0.1f);
        const int paving = line ? M_MARK : M_ROAD;
        const int m = on_walk ? M_SIDEWALK : M_TERRAIN;
        const int l = on_walk ? sidewalk : terrain;
        mat[c] = on_road ? paving : m, lab[c] = on_road ? road : l;
        dep[c] = zg, surf[c] = S_GROUND, hgt[c] = 0.0f, tu[c] = e, tv[c] = zg;
    }
}

/* One side's frontage plane along a row: depth z, height y and block index (-1: no
 * block: the ray turns away or leaves the blocks). */
S2R_INLINE void frontage_row(
    int w, const float *restrict dx, int side, float zwc, float ty, float a, float cc,
    float cam_h, float ywv, float ph, float blen, float *restrict fz, float *restrict fy,
    int32_t *restrict fbi) {
    for (int c = 0; c < w; c++) {
        const float slope = dx[c] / zwc;
        const float q = side == 1 ? slope - ty : ty - slope;
        const float z = plane_depth_vec(side == 1 ? a : -a, q, cc);
        const float y = cam_h + z / zwc * ywv;
        const float bi_f = floor_vec((z + ph) / blen);
        const int ok = (q > 0.0f) & (bi_f >= 0.0f) & (bi_f < (float)NUM_BLOCKS);
        fz[c] = z, fy[c] = y, fbi[c] = ok ? side * NUM_BLOCKS + (int)(ok ? bi_f : 0.0f) : -1;
    }
}

/* Where a row's frontage is nearer than what the row holds, the building, tree line or
 * fence replaces it; fk becomes 1 where a building was hit (its windows come next). */
S2R_BODY void frontage_hit_body(
    int w, int side, int building, int vegetation, int fence, const float *restrict fz,
    const float *restrict fy, const float *restrict ftp, int32_t *restrict fk,
    const int32_t *restrict fcol, float *restrict dep, float *restrict hgt,
    float *restrict tu, float *restrict tv, int32_t *restrict lab, int32_t *restrict mat,
    int32_t *restrict surf) {
    const int sf = side == 0 ? S_LEFT : S_RIGHT;
    const float shift = 37.0f * (float)side;
    for (int c = 0; c < w; c++) {
        const int k = fk[c], col = fcol[c];
        const float z = fz[c], y = fy[c];
        const int hit = (k != 0) & (y >= 0.0f) & (y < ftp[c]) & (z < dep[c]);
        const int is_b = k == BUILDING, is_t = k == TREES;
        int m = is_t ? M_VEG + ((col % 3) + 3) % 3 : M_FENCE;
        m = is_b ? M_BUILDING + col : m;
        int l = is_t ? vegetation : fence;
        l = is_b ? building : l;
        mat[c] = hit ? m : mat[c], lab[c] = hit ? l : lab[c];
        dep[c] = hit ? z : dep[c], surf[c] = hit ? sf : surf[c];
        hgt[c] = hit ? y : hgt[c], tu[c] = hit ? y : tu[c], tv[c] = hit ? z + shift : tv[c];
        fk[c] = hit & is_b;
    }
}

S2R_VARIANTS(frontage_hit,
             (int w, int side, int building, int vegetation, int fence,
              const float *restrict fz, const float *restrict fy, const float *restrict ftp,
              int32_t *restrict fk, const int32_t *restrict fcol, float *restrict dep,
              float *restrict hgt, float *restrict tu, float *restrict tv,
              int32_t *restrict lab, int32_t *restrict mat, int32_t *restrict surf),
             (w, side, building, vegetation, fence, fz, fy, ftp, fk, fcol, dep, hgt, tu, tv,
              lab, mat, surf))

/* One frame of s2r_surfaces, row by row: the ground or sky, then each side's frontage
 * (geometry vectorized; tree crowns, windows and lit windows per pixel, where they
 * occur), then the albedo. */
S2R_BODY void surfaces_body(const SurfArgs *A, int i, const SurfRows *R, int isa) {
    const int h = A->h, w = A->w, levels = A->levels, appearance = A->appearance;
    const int road = A->classes[0], sidewalk = A->classes[1], terrain = A->classes[2];
    const int building = A->classes[3], vegetation = A->classes[4], fence = A->classes[5];
    const int sky = A->classes[6];
    const float texture = A->texture, *noise = A->noise, *tiles = A->tiles;
    const float *palette = A->palette;
    const float *p = A->frame + (size_t)i * FRAME_COLS;
    const float cam_h = p[F_CAM_H], c0 = p[F_C0], ty = p[F_TY], a = p[F_A];
    const float le = p[F_LE], re = p[F_RE], sw = p[F_SW], lw = p[F_LW];
    const float walk_l = le - sw, walk_r = re + sw, last_line = p[F_LANES] - 1.0f;
    const float blen = p[F_BLEN], ou = p[F_TEX_U], ov = p[F_TEX_V];
    const float wet_dark = 0.45f * p[F_WET], pud_level = p[F_DEPOSITS] * 0.55f;
    const float strength = p[F_STRENGTH], density = 48.0f * p[F_SCALE];
    const float four_h = 4.0f * cam_h, focal = p[F_FOCAL];
    const int32_t *kd = A->kind + (size_t)i * 2 * NUM_BLOCKS;
    const int32_t *cl = A->color + (size_t)i * 2 * NUM_BLOCKS;
    const float *tp_all = A->top + (size_t)i * 2 * NUM_BLOCKS;
    const int32_t *fam = A->family + (size_t)i * NUM_MATERIALS;
    const float *tint = A->tints + (size_t)i * NUM_MATERIALS * 3;
    const float *dx = A->dx + (size_t)i * w;
    float *dep = R->dep, *hgt = R->hgt, *tu = R->tu, *tv = R->tv, *em = R->em;
    int32_t *lab = R->lab, *mat = R->mat, *surf = R->surf, *fk = R->fk, *fcol = R->fcol;
    int r, c, side;
    for (r = 0; r < h; r++) {
        const float ywv = A->yw[(size_t)i * h + r], zwv = A->zw[(size_t)i * h + r];
        const float t = cam_h / maxf(-ywv, 1e-4f);
        const float zg = t * zwv;
        const int ground = (ywv < -1e-4f) && (zg < 400.0f);
        const float centre = c0 + ty * zg + a * zg * zg;
        const int dashed = pymodf(zg + p[F_DASH], 9.0f) < 3.0f;
        const float zwc = maxf(zwv, 1e-3f);
        if (ground) {
            ground_row(w, dx, t, centre, le, re, walk_l, walk_r, lw, last_line, dashed, zg, road,
                       sidewalk, terrain, dep, hgt, tu, tv, lab, mat, surf);
        } else {
            for (c = 0; c < w; c++) {
                dep[c] = FAR, lab[c] = sky, mat[c] = M_SKY, surf[c] = S_SKY, hgt[c] = 50.0f;
                tu[c] = 0.0f, tv[c] = 0.0f;
            }
        }
        for (c = 0; c < w; c++) em[c] = 0.0f;
        /* frontages: buildings, tree lines, fences on both sides */
        for (side = 0; side < 2; side++) {
            const float fr = p[F_FRONT_L + side], ph = p[F_PHASE_L + side];
            frontage_row(w, dx, side, zwc, ty, a, side == 1 ? c0 + fr : -fr - c0, cam_h, ywv, ph,
                         blen, R->fz, R->fy, R->fbi);
            for (c = 0; c < w; c++) { /* the block's kind, colour and top; tree crowns */
                const int bi = R->fbi[c];
                if (bi < 0) {
                    fk[c] = 0, fcol[c] = 0, R->ftp[c] = 0.0f;
                    continue;
                }
                fk[c] = kd[bi], fcol[c] = cl[bi], R->ftp[c] = tp_all[bi];
                if (fk[c] == TREES)
                    R->ftp[c] = R->ftp[c] + 1.2f * sinf(R->fz[c] * 1.7f + (float)fcol[c]);
            }
            S2R_PICK(frontage_hit, isa)(w, side, building, vegetation, fence, R->fz, R->fy,
                                        R->ftp, fk, fcol, dep, hgt, tu, tv, lab, mat, surf);
            for (c = 0; c < w; c++) { /* windows, some lit at night */
                if (!fk[c]) continue;
                const float z = R->fz[c], y = R->fy[c], tp = R->ftp[c];
                const float zz = pymodf(z + ph, 3.2f), yy = pymodf(y, 3.0f);
                const int window = zz > 0.7f && zz < 2.4f && yy > 1.0f && yy < 2.2f &&
                                   y > 1.5f && y < tp - 0.8f;
                if (!window) continue;
                mat[c] = M_WINDOW;
                const float cell = floor_fast((z + ph) / 3.2f) * 12.9898f +
                                   floor_fast(y / 3.0f) * 78.233f + (float)fcol[c] * 3.1f;
                const float s = sinf(cell) * 43758.5f;
                if (s - trunc_fast(s) > 0.55f) em[c] = 1.0f;
            }
        }
        /* albedo: palette, value-noise texture, wet paving and puddles */
        for (c = 0; c < w; c++) {
            const size_t px = ((size_t)i * h + r) * w + c;
            const int m = mat[c];
            const float u = tu[c], v = tv[c];
            float mod = 1.0f;
            if (texture > 0.0f && m != M_SKY) {
                const float fine = noise[wrap(v * 9.0f + ov) * TILE + wrap(u * 9.0f + ou)];
                const float coarse = noise[wrap(v * 1.3f) * TILE + wrap(u * 1.3f)];
                mod = 1.0f + texture * ((fine - 0.5f) * 1.2f + (coarse - 0.5f) * 0.8f);
            }
            const int paved = m == M_ROAD || m == M_MARK || m == M_SIDEWALK;
            const float pud = noise[wrap(v * 0.7f + ov) * TILE + wrap(u * 0.7f + ou)];
            const int is_puddle = paved && pud < pud_level;
            mod = mod * (1.0f - wet_dark * (float)paved - 0.35f * (float)is_puddle);
            float factor = 1.0f;
            if (appearance && strength != 0.0f) {
                float footprint = dep[c] / focal;
                if (surf[c] == S_GROUND)
                    footprint = footprint * clampf(dep[c] / four_h, 1.0f, 8.0f);
                int level = (int)(int64_t)log2f(maxf(footprint * density, 1.0f));
                level = level < 0 ? 0 : (level > levels - 1 ? levels - 1 : level);
                const int ta = wrap(u * density + p[F_OFF_A]);
                const int tb = wrap(v * density + p[F_OFF_B]);
                const float tex =
                    tiles[(((size_t)fam[m] * levels + level) * TILE + ta) * TILE + tb];
                factor = 1.0f + strength * (tex - 0.5f) * 1.6f;
            }
            const float *pal = palette + m * 3;
            float *alb = A->albedo + px * 3;
            if (appearance) {
                alb[0] = pal[0] * mod * (factor * tint[m * 3 + 0]);
                alb[1] = pal[1] * mod * (factor * tint[m * 3 + 1]);
                alb[2] = pal[2] * mod * (factor * tint[m * 3 + 2]);
            } else {
                alb[0] = pal[0] * mod, alb[1] = pal[1] * mod, alb[2] = pal[2] * mod;
            }
            A->depth[px] = dep[c], A->label[px] = (uint8_t)lab[c];
            A->surface[px] = (uint8_t)surf[c], A->height[px] = hgt[c];
            A->emissive[px] = em[c], A->puddle[px] = (uint8_t)is_puddle;
        }
    }
}
S2R_VARIANTS(surfaces, (const SurfArgs *A, int i, const SurfRows *R, int isa), (A, i, R, isa))

/* Pass 1: ground and frontages (kernels.background), albedo and puddles
 * (kernels.albedo), and the appearance textures and tints (renderer._appearance).
 *
 * classes: taxonomy indices of road, sidewalk, terrain, building, vegetation, fence,
 * sky. kind, color (int32) and top: (n, 2, NUM_BLOCKS). palette: (NUM_MATERIALS, 3).
 * noise: (TILE, TILE). tiles: (families, levels, TILE, TILE). family (int32) and
 * tints: (n, NUM_MATERIALS) and (n, NUM_MATERIALS, 3), read only with `appearance`.
 */
void s2r_surfaces(int n, int h, int w, const float *dx, const float *yw, const float *zw,
                  const float *frame, const int32_t *kind, const float *top,
                  const int32_t *color, const int32_t *classes, const float *palette,
                  float texture, const float *noise, const float *tiles, int levels,
                  int appearance, const int32_t *family, const float *tints, float *depth,
                  uint8_t *label, uint8_t *surface, float *height, float *emissive,
                  float *albedo, uint8_t *puddle, int threads) {
    const SurfArgs A = {h,       w,       levels,   appearance, dx,     yw,    zw,
                        frame,   top,     palette,  noise,      tiles,  tints, kind,
                        color,   classes, family,   texture,    depth,  height, emissive,
                        albedo,  label,   surface,  puddle};
    const int level = s2r_isa(-1);
    int i;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_or_one(threads))
    for (i = 0; i < n; i++) {
        float *buf = (float *)malloc(sizeof(float) * 14 * (size_t)w);
        if (!buf) continue;
        int32_t *ib = (int32_t *)(buf + 8 * (size_t)w);
        const SurfRows R = {buf,         buf + w,     buf + 2 * w, buf + 3 * w, buf + 4 * w,
                            buf + 5 * w, buf + 6 * w, buf + 7 * w, ib,          ib + w,
                            ib + 2 * w,  ib + 3 * w,  ib + 4 * w,  ib + 5 * w};
        S2R_PICK(surfaces, level)(&A, i, &R, level);
        free(buf);
    }
}

/* Per-frame terms of the sky (kernels.sky). */
typedef struct {
    float zen[3], hor[3], sx, sy, sz, glow_k, sun_up, wind, cloud_gap, cloud_col[3];
} Sky;

static void sky_terms(const float *x, float day, float warm, Sky *s) {
    const float cloud = x[W_CLOUD] / 100.0f, rain = x[W_PRECIP] / 100.0f;
    const float alt = x[W_SUN_ALT] * 0.017453292519943295f;
    const float az = x[W_SUN_AZ] * 0.017453292519943295f;
    const float blue = maxf(2.5f * x[W_RAYLEIGH] / 0.0331f, 0.3f);
    const float zen_day[3] = {0.25f / blue, 0.45f, 0.85f};
    const float hor_day[3] = {0.95f - 0.2f * warm, 0.68f + 0.1f * warm, 0.5f + 0.35f * warm};
    const float night[3] = {0.02f, 0.03f, 0.07f}, grey0[3] = {0.72f, 0.73f, 0.75f};
    const float overcast = clampf(cloud * 0.6f + rain * 0.4f, 0.0f, 1.0f);
    const float cloud_col[3] = {0.92f, 0.92f, 0.94f};
    int ch;
    for (ch = 0; ch < 3; ch++) {
        const float grey = grey0[ch] * (0.15f + 0.85f * day);
        const float zen = zen_day[ch] * day + night[ch] * (1.0f - day);
        const float hor = hor_day[ch] * day + night[ch] * 1.5f * (1.0f - day);
        s->zen[ch] = zen * (1.0f - overcast) + grey * 0.85f * overcast;
        s->hor[ch] = hor * (1.0f - overcast) + grey * overcast;
        s->cloud_col[ch] = cloud_col[ch] * (0.12f + 0.88f * day);
    }
    s->sx = cosf(alt) * sinf(az), s->sy = sinf(alt), s->sz = cosf(alt) * cosf(az);
    s->glow_k = x[W_MIE] / 0.03f * 0.35f;
    s->sun_up = s->sy > -0.05f ? 1.0f : 0.0f;
    s->cloud_gap = 1.0f - cloud * 0.8f;
    s->wind = 1.0f + x[W_WIND] / 40.0f;
}

/* kernels.sky at one pixel: `el`, `tt`, `up` and `cv` are the row's terms. */
static inline void sky_px(const Sky *s, float cloud, float dxv, float ywv, float zwv, float el,
                          float tt, float up, int cv, const float *noise, float *rgb) {
    const float norm = sqrtf(dxv * dxv + ywv * ywv + zwv * zwv);
    const float cos_a = (dxv * s->sx + ywv * s->sy + zwv * s->sz) / norm;
    /* the glow is exactly zero with the sun down, no Mie scattering or full cloud */
    const float glow = s->glow_k == 0.0f || s->cloud_gap == 0.0f || s->sun_up == 0.0f
                           ? 0.0f
                           : s->glow_k * expf((cos_a - 1.0f) * 25.0f) * s->cloud_gap * s->sun_up;
    const float glow_col[3] = {1.0f, 0.85f, 0.6f};
    const int cu = wrap(dxv / up * 40.0f / s->wind);
    float cover = smoothstep(0.0f, 0.25f, noise[cv * TILE + cu] - (1.0f - cloud) * 0.9f);
    cover = el > 0.0f ? cover : 0.0f;
    int ch;
    for (ch = 0; ch < 3; ch++) {
        float v = s->hor[ch] * (1.0f - tt) + s->zen[ch] * tt;
        v = v + glow * glow_col[ch];
        v = v * (1.0f - cover) + s->cloud_col[ch] * cover;
        rgb[ch] = clampf(v, 0.0f, 1.0f);
    }
}

/* One channel of a row of kernels.shade's last steps: reflections of the horizon, night
 * lights, the headlight beam, haze, fog and dust (the terms computed per pixel before). */
S2R_BODY void shade_mix_body(int w, int ch, const float *restrict lit,
                             const float *restrict alb, const float *restrict refl,
                             const float *restrict em, const float *restrict beam,
                             const float *restrict haze, const float *restrict fog,
                             const float *restrict dust, float horizon, float fog_col,
                             float dust_col, float *restrict out) {
    const float warm = ch == 0 ? 1.0f : (ch == 1 ? 0.85f : 0.55f); /* warm_light */
    for (int c = 0; c < w; c++) {
        float v = lit[c] * (1.0f - refl[c]) + horizon * refl[c];
        v = v + em[c] * warm * 1.1f;
        v = v + alb[c * 3 + ch] * (beam[c] * warm * 1.2f);
        v = v + (horizon - v) * haze[c];
        v = v + (fog_col - v) * fog[c];
        v = v + (dust_col - v) * dust[c];
        out[c] = v;
    }
}
S2R_VARIANTS(shade_mix,
             (int w, int ch, const float *restrict lit, const float *restrict alb,
              const float *restrict refl, const float *restrict em, const float *restrict beam,
              const float *restrict haze, const float *restrict fog,
              const float *restrict dust, float horizon, float fog_col, float dust_col,
              float *restrict out),
             (w, ch, lit, alb, refl, em, beam, haze, fog, dust, horizon, fog_col, dust_col, out))

/* Pass 2: light, sky, reflections, night lights, fog/haze/dust, auto exposure and
 * rain streaks (kernels.shade). wx: (n, WX_COLS); light_k: (n, 2) sun and ambient
 * factors; streaks: (3, STREAK_H, STREAK_W) fields; streak: (n, 3) int32 field
 * (-1: no rain), row and column offset. out: (n, 3, h, w) in [0, 1].
 */
void s2r_shade(int n, int h, int w, const float *dx, const float *yw, const float *zw,
               const float *wx, const float *light_k, const float *noise, const float *albedo,
               const uint8_t *surface, const float *emissive, const float *depth,
               const float *height, const uint8_t *puddle, const float *streaks,
               const int32_t *streak, float *out, int threads) {
    const int isa = s2r_isa(-1);
    int i;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_or_one(threads))
    for (i = 0; i < n; i++) {
        const float *x = wx + (size_t)i * WX_COLS;
        const float cloud = x[W_CLOUD] / 100.0f, rain = x[W_PRECIP] / 100.0f;
        const float day = smoothstep(-6.0f, 20.0f, x[W_SUN_ALT]);
        const float warm = smoothstep(0.0f, 40.0f, x[W_SUN_ALT]);
        Sky s;
        sky_terms(x, day, warm, &s);
        const float sun_col[3] = {1.0f, 0.55f + 0.42f * warm, 0.3f + 0.62f * warm};
        const float amb_col[3] = {0.55f + 0.2f * day, 0.62f + 0.23f * day, 1.0f};
        const float amb =
            (0.1f + 0.42f * day * (1.0f - 0.3f * cloud) * (1.0f - 0.3f * rain)) * light_k[i * 2 + 1];
        const float sun =
            0.75f * day * (1.0f - 0.85f * cloud) * (1.0f - 0.6f * rain) * light_k[i * 2];
        const float lambert[5] = {0.0f, maxf(s.sy, 0.0f), maxf(s.sx, 0.0f), maxf(-s.sx, 0.0f),
                                  maxf(-s.sz, 0.0f) * 0.8f + 0.2f * maxf(s.sy, 0.0f)};
        float light[5][3];
        int k, ch, r, c;
        for (k = 0; k < 5; k++)
            for (ch = 0; ch < 3; ch++)
                light[k][ch] = amb * amb_col[ch] + sun * lambert[k] * sun_col[ch];
        const float wet = x[W_WETNESS] / 100.0f, night = 1.0f - day;
        const float k_fog = x[W_FOG_DENSITY] / 100.0f * 0.09f;
        const float k_haze = -(0.0015f * x[W_SCATTER]);
        const float k_dust = -(x[W_DUST] / 100.0f * 0.04f);
        const float level = amb + 0.5f * sun;
        const float fog0[3] = {0.72f, 0.74f, 0.77f}, dust0[3] = {0.62f, 0.48f, 0.32f};
        float fog_col[3], dust_col[3], horizon[3] = {0.0f, 0.0f, 0.0f};
        for (ch = 0; ch < 3; ch++) {
            fog_col[ch] = fog0[ch] * level * 1.4f;
            dust_col[ch] = dust0[ch] * level * 1.4f;
        }
        /* the horizon colour: the sky's mean over the row just above the centre */
        {
            const int hr = h / 2 - 1;
            const float ywv = yw[(size_t)i * h + hr], zwv = zw[(size_t)i * h + hr];
            const float el = clampf(ywv / sqrtf(ywv * ywv + zwv * zwv), -1.0f, 1.0f);
            const float tt = sqrtf(maxf(el, 0.0f)), up = maxf(ywv, 0.02f);
            const int cv = wrap(zwv / up * 40.0f);
            double acc[3] = {0.0, 0.0, 0.0};
            float rgb[3];
            for (c = 0; c < w; c++) {
                sky_px(&s, cloud, dx[(size_t)i * w + c], ywv, zwv, el, tt, up, cv, noise, rgb);
                for (ch = 0; ch < 3; ch++) acc[ch] += rgb[ch];
            }
            for (ch = 0; ch < 3; ch++) horizon[ch] = (float)(acc[ch] / w);
        }
        const size_t plane = (size_t)h * w;
        float *o = out + (size_t)i * 3 * plane;
        double luma = 0.0;
        /* beam_col, then per row: lit (3 rows), refl, em, beam, haze, fog, dust */
        float *beam_col = (float *)malloc(sizeof(float) * 10 * (size_t)w);
        float beam_depth = NAN, beam_exp = 0.0f, last_d = NAN, last_h = NAN;
        float fog = 0.0f, haze = 0.0f, dust = 0.0f;
        if (!beam_col) continue;
        float *t_lit = beam_col + w, *t_refl = t_lit + 3 * (size_t)w, *t_em = t_refl + w;
        float *t_beam = t_em + w, *t_haze = t_beam + w, *t_fog = t_haze + w, *t_dust = t_fog + w;
        for (c = 0; c < w; c++) {
            const float b = dx[(size_t)i * w + c] * 2.5f;
            beam_col[c] = expf(-(b * b));
        }
        for (r = 0; r < h; r++) {
            const float ywv = yw[(size_t)i * h + r], zwv = zw[(size_t)i * h + r];
            const float el = clampf(ywv / sqrtf(ywv * ywv + zwv * zwv), -1.0f, 1.0f);
            const float tt = sqrtf(maxf(el, 0.0f)), up = maxf(ywv, 0.02f);
            const int cv = wrap(zwv / up * 40.0f);
            for (c = 0; c < w; c++) {
                const size_t q = (size_t)r * w + c, px = (size_t)i * plane + q;
                const float dxv = dx[(size_t)i * w + c];
                const int surf = surface[px];
                const float *alb = albedo + px * 3;
                float lit[3];
                if (surf == S_SKY) {
                    sky_px(&s, cloud, dxv, ywv, zwv, el, tt, up, cv, noise, lit);
                } else {
                    for (ch = 0; ch < 3; ch++) lit[ch] = alb[ch] * light[surf][ch];
                }
                for (ch = 0; ch < 3; ch++) t_lit[ch * w + c] = lit[ch];
                const float refl =
                    0.12f * wet * (float)(surf == S_GROUND) + 0.25f * (float)puddle[px];
                /* each term is exactly zero where its factor is (day: no beam, no
                 * fog/haze/dust density), so those pixels skip the exponentials; the
                 * rest depend on depth and height alone, which are the same along a
                 * row of ground or of sky: the last pixel's values are reused */
                const float em = emissive[px] * night, dep = depth[px], d = minf(dep, 300.0f);
                const float hgt = height[px];
                float beam = 0.0f;
                if (night != 0.0f && surf != S_SKY) {
                    if (dep != beam_depth) beam_depth = dep, beam_exp = expf(-dep / 25.0f);
                    beam = beam_exp * beam_col[c] * 1.0f * night;
                }
                if (d != last_d || hgt != last_h) {
                    last_d = d, last_h = hgt, fog = haze = dust = 0.0f;
                    if (k_fog != 0.0f) {
                        const float beyond = maxf(d - x[W_FOG_DIST], 0.0f);
                        const float falloff = expf(-x[W_FOG_FALLOFF] * maxf(hgt, 0.0f) / 10.0f);
                        fog = 1.0f - expf(-k_fog * beyond * falloff);
                    }
                    if (k_haze != 0.0f) haze = 1.0f - expf(k_haze * d);
                    if (k_dust != 0.0f) dust = 1.0f - expf(k_dust * d);
                }
                t_refl[c] = refl, t_em[c] = em, t_beam[c] = beam;
                t_haze[c] = haze, t_fog[c] = fog, t_dust[c] = dust;
            }
            /* the terms combined (vectorized), then summed in the order of before */
            const float *alb_row = albedo + ((size_t)i * plane + (size_t)r * w) * 3;
            for (ch = 0; ch < 3; ch++)
                S2R_PICK(shade_mix, isa)(w, ch, t_lit + ch * w, alb_row, t_refl, t_em, t_beam, t_haze,
                                         t_fog, t_dust, horizon[ch], fog_col[ch], dust_col[ch],
                                         o + ch * plane + (size_t)r * w);
            for (c = 0; c < w; c++) {
                const size_t q = (size_t)r * w + c;
                luma += o[q], luma += o[plane + q], luma += o[2 * plane + q];
            }
        }
        free(beam_col);
        /* auto exposure, then rain streaks in front of everything */
        const float mean = (float)(luma / (3.0 * (double)plane));
        const float gain = clampf(0.4f / maxf(mean, 1e-3f), 1.0f, 2.0f);
        const int field = streak[i * 3];
        const float lift = 0.3f + level;
        for (r = 0; r < h; r++) {
            const float *row = field >= 0 ? streaks + ((size_t)field * STREAK_H +
                                                        (size_t)(((r - streak[i * 3 + 1]) % STREAK_H +
                                                                  STREAK_H) % STREAK_H)) * STREAK_W
                                          : NULL;
            for (c = 0; c < w; c++) {
                const size_t q = (size_t)r * w + c;
                float add = 0.0f;
                if (row) {
                    const int col = ((c - streak[i * 3 + 2]) % STREAK_W + STREAK_W) % STREAK_W;
                    add = row[col] * rain * 0.2f * lift;
                }
                for (ch = 0; ch < 3; ch++) {
                    const float v = o[ch * plane + q] * gain + add;
                    o[ch * plane + q] = clampf(v, 0.0f, 1.0f);
                }
            }
        }
    }
}

/* Sprites (sprites.rasterize) drawn into the buffers, nearest surface winning per pixel,
 * the same arithmetic as the numpy version (template and tile coordinates in double,
 * colours in float32). Each sprite covers the pixels [floor(u0), ceil(u0 + w)) x
 * [floor(v0), ceil(v0 + h)) clipped to the frame; a pixel is opaque where its template
 * part is not 0. Upright sprites: a z-buffer pass takes the minimum depth, then every
 * sprite pixel at that depth writes label, albedo and emissive, later sprites over
 * earlier ones. Decals (`decal`): tested against the depth without changing it; the
 * nearest decal writes albedo only (`best`: an (n, h, w) scratch buffer).
 *
 * Per sprite: frame, template (int64), u0, v0, sw, sh (double), sdepth (float), slabel
 * (uint8), scolor (count, 3) float, stexture (float, NULL: none). templates: (K, T, T)
 * uint8 parts; coloured: (NUM_PARTS) factor of the sprite's colour, < 0 for a part of
 * fixed colour `fixed` (NUM_PARTS, 3); emits: (NUM_PARTS) uint8; canopy: the part that
 * tile (tile_n, tile_n, NULL: none) textures. surface and height (NULL: not kept): an
 * upright sprite's pixels become S_UPRIGHT at height 1 where it moved the depth. */
/* The pixels a sprite covers, [x0, x1) x [y0, y1) clipped to the frame (np.floor,
 * np.ceil, np.clip); 0 where it covers none or lies behind the camera (depth d). */
static int sprite_box(double u0, double v0, double sw, double sh, float d, int h, int w,
                      int *x0, int *x1, int *y0, int *y1) {
    const double fx0 = floor(u0), fx1 = ceil(u0 + sw), fy0 = floor(v0), fy1 = ceil(v0 + sh);
    *x0 = (int)(fx0 < 0.0 ? 0.0 : (fx0 > w ? w : fx0));
    *x1 = (int)(fx1 < 0.0 ? 0.0 : (fx1 > w ? w : fx1));
    *y0 = (int)(fy0 < 0.0 ? 0.0 : (fy0 > h ? h : fy0));
    *y1 = (int)(fy1 < 0.0 ? 0.0 : (fy1 > h ? h : fy1));
    return *x1 > *x0 && *y1 > *y0 && d > 0.0f;
}

/* The template cell (0..T-1) of pixel `pos` along one axis of a sprite at `origin` of
 * `size` pixels: ((pos + 0.5 - origin) / size * T) truncated and clipped. */
static inline int64_t template_cell(int pos, double origin, double size, int T) {
    const int64_t t = (int64_t)(((double)pos + 0.5 - origin) / size * T);
    return t < 0 ? 0 : (t > T - 1 ? T - 1 : t);
}

static void sprite_pass(int pass, int h, int w, int count, const int64_t *frame,
                        const double *u0, const double *v0, const double *sw,
                        const double *sh, const float *sdepth, const int64_t *tmpl,
                        const uint8_t *templates, int T, int decal, float *depth,
                        float *best, uint8_t *surface, float *height) {
    for (int s = 0; s < count; s++) {
        const float d = sdepth[s];
        int x0, x1, y0, y1;
        if (!sprite_box(u0[s], v0[s], sw[s], sh[s], d, h, w, &x0, &x1, &y0, &y1)) continue;
        const uint8_t *tp = templates + (size_t)tmpl[s] * T * T;
        for (int row = y0; row < y1; row++) {
            const int64_t ty = template_cell(row, v0[s], sh[s], T);
            for (int col = x0; col < x1; col++) {
                const int64_t tx = template_cell(col, u0[s], sw[s], T);
                if (!tp[ty * T + tx]) continue;
                const size_t px = ((size_t)frame[s] * h + row) * w + col;
                if (pass == 0) { /* decals: reset the scratch where they land */
                    best[px] = INFINITY;
                } else if (!decal) { /* the z-buffer: np.minimum.at */
                    if (d < depth[px]) {
                        depth[px] = d;
                        if (surface) surface[px] = S_UPRIGHT, height[px] = 1.0f;
                    }
                } else if (d <= depth[px] && d < best[px]) {
                    best[px] = d;
                }
            }
        }
    }
}

void s2r_sprites(int n, int h, int w, int count, const int64_t *frame, const double *u0,
                 const double *v0, const double *sw, const double *sh, const float *sdepth,
                 const int64_t *tmpl, const uint8_t *slabel, const float *scolor,
                 const float *stexture, int decal, const uint8_t *templates, int T,
                 const float *coloured, const uint8_t *emits, const float *fixed, int canopy,
                 const float *tile, int tile_n, float *depth, uint8_t *label, float *albedo,
                 float *emissive, float *best, uint8_t *surface, float *height) {
    int64_t *seen = (int64_t *)calloc((size_t)(n > 0 ? n : 1), sizeof(int64_t));
    if (!seen) return;
    if (decal) sprite_pass(0, h, w, count, frame, u0, v0, sw, sh, sdepth, tmpl, templates, T, 1,
                           depth, best, NULL, NULL);
    sprite_pass(1, h, w, count, frame, u0, v0, sw, sh, sdepth, tmpl, templates, T, decal, depth,
                best, decal ? NULL : surface, height);
    const float *win = decal ? best : depth;
    for (int s = 0; s < count; s++) {
        const int64_t rank = seen[frame[s]]++; /* the sprite's place within its frame */
        const float d = sdepth[s];
        int x0, x1, y0, y1;
        if (!sprite_box(u0[s], v0[s], sw[s], sh[s], d, h, w, &x0, &x1, &y0, &y1)) continue;
        const uint8_t *tp = templates + (size_t)tmpl[s] * T * T;
        const int textured = tile && stexture && stexture[s] > 0.0f;
        for (int row = y0; row < y1; row++) {
            const int64_t ty = template_cell(row, v0[s], sh[s], T);
            for (int col = x0; col < x1; col++) {
                const int64_t tx = template_cell(col, u0[s], sw[s], T);
                const int part = tp[ty * T + tx];
                if (!part) continue;
                const size_t px = ((size_t)frame[s] * h + row) * w + col;
                if (!(d <= win[px]) || (decal && !(d <= depth[px]))) continue;
                float rgb[3];
                for (int ch = 0; ch < 3; ch++)
                    rgb[ch] = coloured[part] < 0.0f ? fixed[part * 3 + ch]
                                                    : scolor[s * 3 + ch] * coloured[part];
                if (textured && part == canopy) {
                    /* the crown spans half a tile, each sprite its own corner of it */
                    const double fy = ((double)row + 0.5 - v0[s]) / sh[s] * (tile_n / 2.0) +
                                      (double)(rank * 37);
                    const double fx = ((double)col + 0.5 - u0[s]) / sw[s] * (tile_n / 2.0) +
                                      (double)(rank * 91);
                    int64_t iy = (int64_t)fy % tile_n, ix = (int64_t)fx % tile_n;
                    iy += iy < 0 ? tile_n : 0, ix += ix < 0 ? tile_n : 0;
                    const float t = tile[iy * tile_n + ix];
                    const float f = 1.0f + stexture[s] * (t - 0.5f) * 1.6f;
                    for (int ch = 0; ch < 3; ch++) rgb[ch] = rgb[ch] * f;
                }
                for (int ch = 0; ch < 3; ch++) albedo[px * 3 + ch] = rgb[ch];
                if (!decal) {
                    label[px] = slabel[s];
                    emissive[px] = emits[part] ? 1.0f : 0.0f;
                }
            }
        }
    }
    free(seen);
}

/* A separable Gaussian blur of `planes` (h, w) planes in place, truncated at radius
 * ceil(3 sigma) (at least 1), replicated edges, the kernel normalized to sum 1. The taps
 * are the outer loop so the inner loops run along contiguous pixels and vectorize;
 * each pixel still sums its taps in order. */
S2R_BODY void blur_planes_body(float *im, int planes, int h, int w, float sigma) {
    const size_t plane = (size_t)h * w;
    const float sg = maxf(sigma, 1e-3f);
    const int radius = (int)ceilf(3.0f * sigma) < 1 ? 1 : (int)ceilf(3.0f * sigma);
    const int taps = 2 * radius + 1;
    float *k = (float *)malloc(sizeof(float) * (taps + w + 2 * radius + plane));
    float total = 0.0f;
    int j, ch, r, c;
    if (!k) return;
    float *line = k + taps, *copy = line + w + 2 * radius;
    for (j = 0; j < taps; j++) {
        const float t = (float)(j - radius) / sg;
        k[j] = expf(-0.5f * (t * t));
        total += k[j];
    }
    for (j = 0; j < taps; j++) k[j] = k[j] / total;
    for (ch = 0; ch < planes; ch++) {
        float *pl = im + ch * plane;
        for (r = 0; r < h; r++) { /* along the row */
            float *row = pl + (size_t)r * w;
            for (c = 0; c < radius; c++) line[c] = row[0];
            memcpy(line + radius, row, sizeof(float) * w);
            for (c = 0; c < radius; c++) line[radius + w + c] = row[w - 1];
            for (c = 0; c < w; c++) row[c] = k[0] * line[c];
            for (j = 1; j < taps; j++) {
                const float kj = k[j];
                const float *src = line + j;
                for (c = 0; c < w; c++) row[c] += kj * src[c];
            }
        }
        memcpy(copy, pl, sizeof(float) * plane);
        for (r = 0; r < h; r++) { /* down the column */
            float *row = pl + (size_t)r * w;
            for (j = 0; j < taps; j++) {
                const int t = r + j - radius, sr = t < 0 ? 0 : (t >= h ? h - 1 : t);
                const float kj = k[j];
                const float *src = copy + (size_t)sr * w;
                if (j == 0)
                    for (c = 0; c < w; c++) row[c] = kj * src[c];
                else
                    for (c = 0; c < w; c++) row[c] += kj * src[c];
            }
        }
    }
    free(k);
}
S2R_VARIANTS(blur_planes, (float *im, int planes, int h, int w, float sigma),
             (im, planes, h, w, sigma))

/* Row `row` of a noise bank plane (bank_w wide) from column dxo, w long; with `flip`
 * mirrored into `flipped` (w floats), so that the row loops read it in order. */
static const float *noise_row(const float *plane, int bank_w, int row, int dxo, int w,
                              int flip, float *flipped) {
    const float *src = plane + (size_t)row * bank_w + dxo;
    if (!flip) return src;
    for (int c = 0; c < w; c++) flipped[c] = src[w - 1 - c];
    return flipped;
}

/* One row of the sensor's gain and noise (nrow: already flipped where the crop is). */
S2R_BODY void sensor_row_body(int w, float *restrict pl, const float *restrict rd2,
                              const float *restrict nrow, int gained, float vignetting,
                              float exposure, float std) {
    const int noisy = std > 0.0f;
    for (int c = 0; c < w; c++) {
        float v = pl[c];
        const float g = v * ((1.0f - vignetting * rd2[c]) * exposure);
        v = gained ? g : v;
        const float nz = v + nrow[c] * std;
        v = noisy ? nz : v;
        pl[c] = clampf(v, 0.0f, 1.0f);
    }
}
S2R_VARIANTS(sensor_row,
             (int w, float *restrict pl, const float *restrict rd2, const float *restrict nrow,
              int gained, float vignetting, float exposure, float std),
             (w, pl, rd2, nrow, gained, vignetting, exposure, std))

/* Sensor effects (simulation/sensor.apply_sensor_effects) on img (n, 3, h, w) in
 * place: a separable Gaussian blur of each frame's own radius ceil(3 sigma) with
 * replicated edges (sigma < 0.05: none), the gain (1 - vignetting r^2) * exposure,
 * then bank noise times noise_std, clamped to [0, 1]. rd2: (h, w) squared radial
 * distance; bank: (3, bank_h, bank_w) noise; crop: (n, 3) int32 row, column, flip.
 */
void s2r_sensor(int n, int h, int w, float *img, const float *sigma, const float *vignetting,
                const float *exposure, const float *noise_std, const float *rd2,
                const float *bank, int bank_h, int bank_w, const int32_t *crop, int threads) {
    const int isa = s2r_isa(-1);
    int i;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_or_one(threads))
    for (i = 0; i < n; i++) {
        const size_t plane = (size_t)h * w;
        float *im = img + (size_t)i * 3 * plane;
        int ch, r;
        if (sigma[i] >= 0.05f) S2R_PICK(blur_planes, isa)(im, 3, h, w, sigma[i]);
        const int gained = vignetting[i] > 0.0f || exposure[i] != 1.0f;
        const float std = noise_std[i];
        const int dy = crop[i * 3], dxo = crop[i * 3 + 1], flip = crop[i * 3 + 2];
        float *flipped = (float *)malloc(sizeof(float) * w);
        if (!flipped) continue;
        for (ch = 0; ch < 3; ch++) {
            float *pl = im + ch * plane;
            const float *nb = bank + (size_t)ch * bank_h * bank_w;
            for (r = 0; r < h; r++) {
                const float *nrow = noise_row(nb, bank_w, dy + r, dxo, w, flip, flipped);
                S2R_PICK(sensor_row, isa)(w, pl + (size_t)r * w, rd2 + (size_t)r * w, nrow, gained,
                                          vignetting[i], exposure[i], std);
            }
        }
        free(flipped);
    }
}

/* dst (h, w) = src magnified by 1 / scale about the centre, bilinear with the border
 * replicated (grid_sample's padding_mode="border"): pixel (r, c) samples ((gy scale + 1) / 2
 * (h - 1), (gx scale + 1) / 2 (w - 1)), gy and gx in [-1, 1]. The position is separable, so the
 * corners and weights are computed once per column and once per row. */
static void magnify_plane(float *dst, const float *src, int h, int w, float scale) {
    int *x0 = (int *)malloc(sizeof(int) * 2 * (size_t)w);
    float *ax = (float *)malloc(sizeof(float) * (size_t)w);
    int r, c;
    if (!x0 || !ax) {
        free(x0), free(ax);
        return;
    }
    int *x1 = x0 + w;
    for (c = 0; c < w; c++) {
        const float gx = w > 1 ? -1.0f + 2.0f * c / (float)(w - 1) : 0.0f;
        const float bx = clampf((gx * scale + 1.0f) / 2.0f * (w - 1), 0.0f, (float)(w - 1));
        x0[c] = (int)bx, x1[c] = x0[c] + 1 < w ? x0[c] + 1 : w - 1, ax[c] = bx - x0[c];
    }
    for (r = 0; r < h; r++) {
        const float gy = h > 1 ? -1.0f + 2.0f * r / (float)(h - 1) : 0.0f;
        const float by = clampf((gy * scale + 1.0f) / 2.0f * (h - 1), 0.0f, (float)(h - 1));
        const int y0 = (int)by, y1 = y0 + 1 < h ? y0 + 1 : h - 1;
        const float ay = by - y0;
        const float *t = src + (size_t)y0 * w, *b = src + (size_t)y1 * w;
        float *out = dst + (size_t)r * w;
        for (c = 0; c < w; c++) {
            const float top = t[x0[c]] * (1.0f - ax[c]) + t[x1[c]] * ax[c];
            const float bot = b[x0[c]] * (1.0f - ax[c]) + b[x1[c]] * ax[c];
            out[c] = top * (1.0f - ay) + bot * ay;
        }
    }
    free(x0), free(ax);
}

/* camera_effects.filmic: Narkowicz's ACES fit on 1.6 x, clamped to [0, 1]. */
static inline float filmic(float x) {
    const float a = 2.51f, b = 0.03f, c = 2.43f, d = 0.59f, e = 0.14f;
    const float y = (x * 1.6f) * (a * x * 1.6f + b) / ((x * 1.6f) * (c * x * 1.6f + d) + e);
    return clampf(y, 0.0f, 1.0f);
}

/* One row of the camera's response: vignetting, the filmic blend, signal-dependent
 * noise (nrow: the row's noise, already flipped where the crop is), clamped. */
S2R_BODY void camera_row_body(int w, float *restrict pl, const float *restrict rd2,
                              const float *restrict nrow, float vignetting, float response,
                              float shot2, float read2) {
    /* every step is computed and selected, so that the loop vectorizes (GCC 12 does so
     * only where the selects' conditions are float comparisons) */
    const float noisy = (shot2 > 0.0f || read2 > 0.0f) ? 1.0f : 0.0f;
    for (int c = 0; c < w; c++) {
        float v = pl[c];
        const float vg = v * (1.0f - vignetting * rd2[c]);
        v = vignetting > 0.0f ? vg : v;
        const float fl = v * (1.0f - response) + filmic(clampf(v, 0.0f, 1.0f)) * response;
        v = response > 0.0f ? fl : v;
        const float nz = v + nrow[c] * sqrtf(maxf(v, 0.0f) * shot2 + read2);
        v = noisy > 0.0f ? nz : v;
        pl[c] = clampf(v, 0.0f, 1.0f);
    }
}
S2R_VARIANTS(camera_row,
             (int w, float *restrict pl, const float *restrict rd2, const float *restrict nrow,
              float vignetting, float response, float shot2, float read2),
             (w, pl, rd2, nrow, vignetting, response, shot2, read2))

/* camera_effects._quantize_blocks on one (h, w) plane in place: 8x8 blocks (the plane
 * padded by replication to whole blocks), orthonormal 2-D DCT-II, each coefficient
 * rounded (half to even) to a multiple of table[u * 8 + v], and the inverse DCT.
 * basis: (8, 8) c[u][x]. */
S2R_BODY void quantize_plane_body(float *pl, int h, int w, const float *table,
                                  const float *basis) {
    const int hb = (h + 7) / 8, wb = (w + 7) / 8;
    int by, bx, u, v, x, y;
    for (by = 0; by < hb; by++) {
        for (bx = 0; bx < wb; bx++) {
            float blk[8][8], tmp[8][8], coef[8][8];
            for (y = 0; y < 8; y++) {
                const int sy = by * 8 + y < h ? by * 8 + y : h - 1;
                for (x = 0; x < 8; x++) {
                    const int sx = bx * 8 + x < w ? bx * 8 + x : w - 1;
                    blk[y][x] = pl[(size_t)sy * w + sx];
                }
            }
            for (u = 0; u < 8; u++) /* rows: tmp[u][x] = sum_y c[u][y] blk[y][x] */
                for (x = 0; x < 8; x++) {
                    float acc = 0.0f;
                    for (y = 0; y < 8; y++) acc += basis[u * 8 + y] * blk[y][x];
                    tmp[u][x] = acc;
                }
            for (u = 0; u < 8; u++) /* columns, then quantize */
                for (v = 0; v < 8; v++) {
                    float acc = 0.0f;
                    for (x = 0; x < 8; x++) acc += basis[v * 8 + x] * tmp[u][x];
                    const float t = table[u * 8 + v];
                    coef[u][v] = rint_fast(acc / t) * t;
                }
            for (y = 0; y < 8; y++) /* inverse: tmp[y][v] = sum_u c[u][y] coef[u][v] */
                for (v = 0; v < 8; v++) {
                    float acc = 0.0f;
                    for (u = 0; u < 8; u++) acc += basis[u * 8 + y] * coef[u][v];
                    tmp[y][v] = acc;
                }
            for (y = 0; y < 8; y++) {
                if (by * 8 + y >= h) break;
                for (x = 0; x < 8; x++) {
                    if (bx * 8 + x >= w) break;
                    float acc = 0.0f;
                    for (v = 0; v < 8; v++) acc += basis[v * 8 + x] * tmp[y][v];
                    pl[(size_t)(by * 8 + y) * w + bx * 8 + x] = acc;
                }
            }
        }
    }
}
S2R_VARIANTS(quantize_plane,
             (float *pl, int h, int w, const float *table, const float *basis),
             (pl, h, w, table, basis))

/* The photo style's camera pipeline (camera_effects.apply) on img (n, 3, h, w) in place:
 * white balance gains (n, 3) (NULL: none), lens blur (sigma px, 0: none), lateral
 * chromatic aberration (ca_k: the relative magnification of red, 0: none), vignetting,
 * the filmic response blend, signal-dependent noise from `bank` at `crop`, clamping,
 * then JPEG at the given tables (luma, chroma: 64 each; NULL: no JPEG). rd2: (h, w).
 */
void s2r_camera(int n, int h, int w, float *img, const float *gains, float lens_sigma,
                float ca_k, float vignetting, const float *rd2, float response, float shot2,
                float read2, const float *bank, int bank_h, int bank_w, const int32_t *crop,
                const float *luma_table, const float *chroma_table, const float *basis,
                int threads) {
    const int level = s2r_isa(-1);
    int i;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_or_one(threads))
    for (i = 0; i < n; i++) {
        const size_t plane = (size_t)h * w;
        float *im = img + (size_t)i * 3 * plane;
        int ch, r, c;
        if (gains)
            for (ch = 0; ch < 3; ch++)
                for (size_t q = 0; q < plane; q++) im[ch * plane + q] *= gains[i * 3 + ch];
        if (lens_sigma >= 0.05f) S2R_PICK(blur_planes, level)(im, 3, h, w, lens_sigma);
        if (ca_k > 0.0f) { /* red magnified, blue shrunk, about the centre */
            float *copy = (float *)malloc(sizeof(float) * 2 * plane);
            if (copy) {
                memcpy(copy, im, sizeof(float) * plane);
                memcpy(copy + plane, im + 2 * plane, sizeof(float) * plane);
                magnify_plane(im, copy, h, w, 1.0f - ca_k);
                magnify_plane(im + 2 * plane, copy + plane, h, w, 1.0f + ca_k);
                free(copy);
            }
        }
        const int dy = crop[i * 3], dxo = crop[i * 3 + 1], flip = crop[i * 3 + 2];
        float *flipped = (float *)malloc(sizeof(float) * w);
        if (!flipped) continue;
        for (ch = 0; ch < 3; ch++) {
            float *pl = im + ch * plane;
            const float *nb = bank + (size_t)ch * bank_h * bank_w;
            for (r = 0; r < h; r++) {
                const float *nrow = noise_row(nb, bank_w, dy + r, dxo, w, flip, flipped);
                S2R_PICK(camera_row, level)(w, pl + (size_t)r * w, rd2 + (size_t)r * w, nrow,
                                            vignetting, response, shot2, read2);
            }
        }
        free(flipped);
        if (!luma_table) continue;
        /* JPEG: YCbCr, 4:2:0 chroma (2x2 means), blockwise quantization, back to RGB */
        const int ch_h = (h + 1) / 2, ch_w = (w + 1) / 2;
        const size_t cplane = (size_t)ch_h * ch_w;
        float *yp = (float *)malloc(sizeof(float) * (plane + 2 * cplane));
        if (!yp) continue;
        float *cb = yp + plane, *cr = cb + cplane;
        for (size_t q = 0; q < cplane; q++) cb[q] = cr[q] = 0.0f;
        for (r = 0; r < h; r++)
            for (c = 0; c < w; c++) {
                const size_t q = (size_t)r * w + c, cq = (size_t)(r / 2) * ch_w + c / 2;
                const float R = im[q] * 255.0f, G = im[plane + q] * 255.0f;
                const float B = im[2 * plane + q] * 255.0f;
                yp[q] = 0.299f * R + 0.587f * G + 0.114f * B - 128.0f;
                cb[cq] += -0.168736f * R - 0.331264f * G + 0.5f * B;
                cr[cq] += 0.5f * R - 0.418688f * G - 0.081312f * B;
            }
        for (r = 0; r < ch_h; r++)
            for (c = 0; c < ch_w; c++) {
                const int cnt = (2 * r + 1 < h ? 2 : 1) * (2 * c + 1 < w ? 2 : 1);
                cb[(size_t)r * ch_w + c] /= (float)cnt;
                cr[(size_t)r * ch_w + c] /= (float)cnt;
            }
        S2R_PICK(quantize_plane, level)(yp, h, w, luma_table, basis);
        S2R_PICK(quantize_plane, level)(cb, ch_h, ch_w, chroma_table, basis);
        S2R_PICK(quantize_plane, level)(cr, ch_h, ch_w, chroma_table, basis);
        for (r = 0; r < h; r++)
            for (c = 0; c < w; c++) {
                const size_t q = (size_t)r * w + c, cq = (size_t)(r / 2) * ch_w + c / 2;
                const float Y = yp[q], Cb = cb[cq], Cr = cr[cq];
                im[q] = clampf((Y + 1.402f * Cr + 128.0f) / 255.0f, 0.0f, 1.0f);
                im[plane + q] =
                    clampf((Y - 0.344136f * Cb - 0.714136f * Cr + 128.0f) / 255.0f, 0.0f, 1.0f);
                im[2 * plane + q] = clampf((Y + 1.772f * Cb + 128.0f) / 255.0f, 0.0f, 1.0f);
            }
        free(yp);
    }
}

/* A float in [0, 1] as the byte the backend stores: round(255 v) half up, as
 * (v * 255 + 0.5).clamp(0, 255).byte() after v.clamp(0, 1). */
static inline uint8_t to_byte(float v) {
    return (uint8_t)(int)clampf(clampf(v, 0.0f, 1.0f) * 255.0f + 0.5f, 0.0f, 255.0f);
}

/* to_byte over a row (vectorized). */
S2R_INLINE void bytes_row(int w, const float *restrict v, uint8_t *restrict out) {
    for (int c = 0; c < w; c++) out[c] = to_byte(v[c]);
}

/* Three planar rows of bytes (3 w) as one RGB row (w, 3). */
S2R_INLINE void interleave_row(int w, const uint8_t *restrict planes, uint8_t *restrict rgb) {
    for (int c = 0; c < w; c++) {
        rgb[c * 3] = planes[c], rgb[c * 3 + 1] = planes[w + c], rgb[c * 3 + 2] = planes[2 * w + c];
    }
}

/* One row of the roll's sampling positions (the same float maths at every column, so
 * it vectorizes): label source index (-1: outside the frame, -2: outside the view),
 * bilinear corner offset, steps and weights. */
S2R_INLINE void roll_row(
    int h, int w, float t0, float gx0, float t3, float gy0, int32_t *restrict lidx,
    int32_t *restrict o00, int32_t *restrict stepx, int32_t *restrict stepy,
    float *restrict ax, float *restrict ay) {
    for (int c = 0; c < w; c++) {
        const float x = (2.0f * c + 1.0f) / w - 1.0f;
        const float gx = x * t0 + gx0, gy = x * t3 + gy0;
        const float fx = ((gx + 1.0f) * w - 1.0f) / 2.0f;
        const float fy = ((gy + 1.0f) * h - 1.0f) / 2.0f;
        /* labels: nearest (half to even), 255 outside the original view; inside it
         * |fx|, |fy| < 2^22, where the rounding trick is exact */
        const int inside = (fabsf(gx) <= 1.0f) & (fabsf(gy) <= 1.0f);
        const float rx = (clampf(fx, -2.0f, (float)w + 1.0f) + 12582912.0f) - 12582912.0f;
        const float ry = (clampf(fy, -2.0f, (float)h + 1.0f) + 12582912.0f) - 12582912.0f;
        const int nx = (int)rx, ny = (int)ry;
        const int valid = (nx >= 0) & (nx < w) & (ny >= 0) & (ny < h);
        int li = valid ? ny * w + nx : -1;
        lidx[c] = inside ? li : -2;
        /* image: bilinear, the coordinates clipped to the border */
        const float bx = clampf(fx, 0.0f, (float)(w - 1));
        const float by = clampf(fy, 0.0f, (float)(h - 1));
        const int x0 = (int)bx, y0 = (int)by; /* both >= 0 */
        o00[c] = y0 * w + x0;
        stepx[c] = x0 + 1 < w ? 1 : 0;
        stepy[c] = y0 + 1 < h ? w : 0;
        ax[c] = bx - x0, ay[c] = by - y0;
    }
}

/* One row of bilinear samples of plane `pl` at roll_row's corners and weights. Kept
 * scalar: the AVX-512 gathers GCC makes of it were no faster here (0.55-0.70 against
 * 0.47-0.78 ms a frame for the whole pass), and gathers are slow on CPUs with the
 * Gather Data Sampling mitigation. */
S2R_SCALAR void bilinear_row(
    int w, const float *restrict pl, const int32_t *restrict o00, const int32_t *restrict stepx,
    const int32_t *restrict stepy, const float *restrict ax, const float *restrict ay,
    float *restrict val) {
    for (int c = 0; c < w; c++) {
        const int o = o00[c], sx = stepx[c], sy = stepy[c];
        const float a = ax[c], b = ay[c];
        const float top = pl[o] * (1.0f - a) + pl[o + sx] * a;
        const float bot = pl[o + sy] * (1.0f - a) + pl[o + sy + sx] * a;
        val[c] = top * (1.0f - b) + bot * b;
    }
}

/* One frame of s2r_finish. `scratch` holds 4 * w int32, 3 * w floats and
 * 3 * w bytes. */
S2R_BODY void finish_body(int h, int w, const float *restrict in, const uint8_t *restrict lin,
                          const float *t, int rolled, uint8_t *restrict rgb,
                          uint8_t *restrict lout, int32_t *restrict scratch) {
    const size_t plane = (size_t)h * w;
    int r, c;
    uint8_t *bytes = (uint8_t *)(scratch + 7 * (size_t)w); /* 3 w */
    if (!rolled) {
        memcpy(lout, lin, plane);
        for (r = 0; r < h; r++) {
            const float *row = in + (size_t)r * w;
            uint8_t *orow = rgb + (size_t)r * w * 3;
            for (int ch = 0; ch < 3; ch++) bytes_row(w, row + ch * plane, bytes + ch * w);
            interleave_row(w, bytes, orow);
        }
        return;
    }
    int32_t *lidx = scratch, *o00 = lidx + w, *stepx = o00 + w, *stepy = stepx + w;
    float *ax = (float *)(stepy + w), *ay = ax + w, *val = ay + w;
    for (r = 0; r < h; r++) {
        const float y = (2.0f * r + 1.0f) / h - 1.0f;
        const float gx0 = y * t[1] + t[2], gy0 = y * t[4] + t[5], t0 = t[0], t3 = t[3];
        roll_row(h, w, t0, gx0, t3, gy0, lidx, o00, stepx, stepy, ax, ay);
        uint8_t *lrow = lout + (size_t)r * w, *orow = rgb + (size_t)r * w * 3;
        for (c = 0; c < w; c++) {
            const int li = lidx[c];
            lrow[c] = li >= 0 ? lin[li] : (li == -1 ? 0 : 255);
        }
        for (int ch = 0; ch < 3; ch++) {
            bilinear_row(w, in + ch * plane, o00, stepx, stepy, ax, ay, val);
            bytes_row(w, val, bytes + ch * w);
        }
        interleave_row(w, bytes, orow);
    }
}
S2R_VARIANTS(finish,
             (int h, int w, const float *in, const uint8_t *lin, const float *t, int rolled,
              uint8_t *rgb, uint8_t *lout, int32_t *scratch),
             (h, w, in, lin, t, rolled, rgb, lout, scratch))

/* The last pass: the camera's roll (renderer._roll) and the image as bytes. Frames whose
 * theta (n, 2, 3) is not the identity (rolled[i]) are resampled, the image bilinearly
 * with replicated edges, the labels by nearest neighbour, 255 where the rotated view
 * leaves the original one. src (n, 3, h, w) float and src_label (n, h, w) are read;
 * rgb (n, h, w, 3) uint8, round(255 v) of the image clamped to [0, 1], and label
 * (n, h, w) are written. */
void s2r_finish(int n, int h, int w, const float *src, const uint8_t *src_label,
                const float *theta, const uint8_t *rolled, uint8_t *rgb, uint8_t *label,
                int threads) {
    const int level = s2r_isa(-1);
    int i;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_or_one(threads))
    for (i = 0; i < n; i++) {
        const size_t plane = (size_t)h * w;
        int32_t *scratch = (int32_t *)malloc(sizeof(int32_t) * 8 * (size_t)w);
        if (!scratch) continue;
        S2R_PICK(finish, level)(h, w, src + (size_t)i * 3 * plane, src_label + (size_t)i * plane,
                                theta + (size_t)i * 6, rolled[i], rgb + (size_t)i * 3 * plane,
                                label + (size_t)i * plane, scratch);
        free(scratch);
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused",
                                    "The renderer's fused per-pixel passes (loaded by ctypes).",
                                    -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
