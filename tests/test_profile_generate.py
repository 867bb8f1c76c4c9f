"""analysis/profile_generate.py: kernel categories on real Hopper kernel names, and the CPU smoke mode end to end."""

import json

import pytest
from scripts import load_script


@pytest.mark.parametrize("name, cat", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "matmul"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4, false, false>", "matmul"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_coopA_TNT", "matmul"),
    ("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("triton_tem_fused_0", "attention"),  # flex attention's template kernel
    ("triton_tem_fused_addmm_3", "matmul"),  # an Inductor matmul template
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "fused (Inductor)"),
    ("void at::native::(anonymous namespace)::rms_norm_kernel<float>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "rope/elementwise"),
    ("void at::native::index_put_kernel_impl<at::native::OpaqueType<2>>", "copy/cache write"),
    ("Memcpy DtoD (Device -> Device)", "copy/cache write"),
    ("some_unknown_kernel", "other"),
])
def test_kernel_categories(name, cat):
    assert load_script("analysis/profile_generate.py").category(name) == cat


def test_cpu_smoke_profiles_both_phases_of_both_layouts(tmp_path):
    prof = load_script("analysis/profile_generate.py")
    out = tmp_path / "p.json"
    res = prof.main(["--tiny", "--ctx", "200", "--steps", "2", "--reps", "2", "--fuse-projections", "--out", str(out)])
    assert json.loads(out.read_text())["layouts"].keys() == {"hybrid", "dense"} == res["layouts"].keys()
    assert res["shape"] == "tiny" and res["ctx"] == 200 and res["full_layers"] and res["args"]["fuse_projections"]
    for layout in ("hybrid", "dense"):
        for phase in ("prefill", "decode"):
            p = res["layouts"][layout][phase]
            assert p["kernel_ms"] > 0 and p["kernels"] > 0 and p["top"]
            assert sum(p["by_category_ms"].values()) == pytest.approx(p["kernel_ms"])
            assert {t["category"] for t in p["top"]} <= set(p["by_category_ms"])
        assert res["layouts"][layout]["prefill"]["wall_s"] > 0
        assert res["layouts"][layout]["decode"]["eager_step_ms"] > 0
        assert "graphed_step_ms" not in res["layouts"][layout]["decode"]  # CUDA graphs only on a GPU
    # the steps at positions 200, 201, ... over caches sized for them: the full layer's buffer not yet full (masked),
    # the AttnSink(4, 60) rings full (mask-free)
    assert res["layouts"]["hybrid"]["decode"]["decode_routes"] == {"sdpa_exact": 3, "sdpa_masked": 1}
    assert res["layouts"]["dense"]["decode"]["decode_routes"] == {"sdpa_masked": 4}


def test_bad_arguments_fail_before_building_anything(tmp_path):
    prof = load_script("analysis/profile_generate.py")
    with pytest.raises(SystemExit):
        prof.main(["--tiny", "--ctx", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
