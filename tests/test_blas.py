"""The OpenBLAS kernel choice made before MLX loads (``_blas.coretype_for``)."""

from specstream_mlx import _blas

# Literal flag sets, as /proc/cpuinfo prints them (abridged).
XEON_2023 = set("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512cd "
                "avx512bw avx512vl avx512_bf16 amx_tile".split())
EPYC_ZEN3 = set("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma".split())
OLD_ATOM = set("fpu sse sse2 ssse3".split())


def test_complete_avx512_takes_skylakex_kernels():
    assert _blas.coretype_for(XEON_2023) == "SkylakeX"


def test_avx2_without_avx512_takes_haswell_kernels():
    assert _blas.coretype_for(EPYC_ZEN3) == "Haswell"


def test_partial_avx512_does_not_take_skylakex_kernels():
    # avx512f alone (Knights Landing has no avx512bw/vl) must not get SkylakeX kernels
    assert _blas.coretype_for(EPYC_ZEN3 | {"avx512f", "avx512cd"}) == "Haswell"


def test_older_cpus_keep_openblas_own_choice():
    assert _blas.coretype_for(OLD_ATOM) is None
    assert _blas.coretype_for(set()) is None
