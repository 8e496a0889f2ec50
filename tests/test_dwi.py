"""Tests of lesiontrack.dwi: b-value/b-vector reading and the trace ADC fit."""
import numpy as np
import pytest

from lesiontrack.config import load_config
from lesiontrack.dwi import DWIError, adc_unit_scale, fit_dwi, read_bvals_bvecs
from lesiontrack.image import Image

CFG = load_config()["segment"]


def _series(bvals, adc, s0, rng=None, anisotropy=0.0):
    n = len(bvals)
    dirs = np.tile(np.eye(3), (n // 3 + 1, 1))[:n]
    vols = []
    for b, g in zip(bvals, dirs):
        # anisotropic diffusion whose trace is 3*adc: D = adc * (1 + anisotropy * (3 g_x^2 - 1))
        d = adc * (1.0 + anisotropy * (3 * g[0] ** 2 - 1.0)) if b > 0 else adc
        vols.append(s0 * np.exp(-b * d))
    data = np.stack(vols, axis=-1).astype(np.float32)
    if rng is not None:
        data += rng.normal(0, 1e-3 * s0.mean(), data.shape).astype(np.float32)
    return Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), dirs


def test_fit_recovers_adc_two_shells():
    rng = np.random.default_rng(0)
    adc = rng.uniform(0.3e-3, 3e-3, (6, 5, 4)).astype(np.float32)
    s0 = rng.uniform(500, 1500, (6, 5, 4)).astype(np.float32)
    bvals = np.array([0, 0] + [1000] * 6 + [2000] * 6, float)
    img, dirs = _series(bvals, adc, s0, anisotropy=0.3)
    cfg = dict(CFG, adc_fit_b_max=2500.0)
    maps = fit_dwi(img, bvals, dirs, cfg)
    np.testing.assert_allclose(maps.adc.data, adc, rtol=1e-3)
    np.testing.assert_allclose(maps.b0.data, s0, rtol=1e-5)
    # b1000 = mean of the highest shell fitted
    np.testing.assert_allclose(maps.b1000.data, img.data[..., 8:].mean(axis=-1), rtol=1e-5)
    assert maps.adc.data.dtype == np.float32 and maps.adc.same_grid(maps.b0)
    assert maps.b_fitted == (0.0, 1000.0, 2000.0)


def _kurtotic_series(bvals, d, k, s0):
    """Trace signal of the diffusional-kurtosis model, S = S0 exp(-b D + b^2 D^2 K / 6)."""
    b = np.asarray(bvals, float)
    data = s0[..., None] * np.exp(-b * d[..., None] + (b * d[..., None]) ** 2 * k[..., None] / 6)
    n = len(b)
    return Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), np.tile(np.eye(3), (n // 3 + 1, 1))[:n]


def test_multishell_adc_is_the_clinical_b1000_adc():
    """A research protocol's b=2000 and 3000 shells are left out of the fit: the ADC (and
    the trace image) are those of its b=0 and b=1000 volumes alone, on which the
    restricted-diffusion level is defined. Fitted through every shell, normal white
    matter (D 0.8e-3, kurtosis 1) would fall below that level."""
    shape = (4, 4, 3)
    d = np.full(shape, 0.8e-3)
    d[0] = 1.2e-3                                            # lesion: faster, less kurtotic
    k = np.full(shape, 1.0)
    k[0] = 0.5
    s0 = np.full(shape, 1000.0)
    bvals = np.array([0, 0] + [1000] * 6 + [2000] * 6 + [3000] * 6, float)
    img, dirs = _kurtotic_series(bvals, d, k, s0)
    maps = fit_dwi(img, bvals, dirs, CFG)
    clinical = np.r_[0:8]
    ref = fit_dwi(Image(img.data[..., clinical], img.affine), bvals[clinical], dirs[clinical], CFG)
    np.testing.assert_allclose(maps.adc.data, ref.adc.data, rtol=1e-6)
    np.testing.assert_allclose(maps.b1000.data, ref.b1000.data, rtol=1e-6)
    assert maps.b_fitted == (0.0, 1000.0)
    # the clinical ADC of white matter: D - b D^2 K / 6 at b = 1000
    np.testing.assert_allclose(maps.adc.data[1:], 0.8e-3 - 1000 * 0.8e-3 ** 2 / 6, rtol=1e-3)
    assert maps.adc.data[1:].min() > CFG["adc_max_restricted"]
    every = fit_dwi(img, bvals, dirs, dict(CFG, adc_fit_b_max=5000.0))
    assert every.adc.data[1:].max() < CFG["adc_max_restricted"]      # what the limit prevents


def test_series_with_only_high_shells_is_fitted_on_the_lowest(caplog):
    shape = (3, 3, 3)
    bvals = np.array([0, 2000, 2000, 2000, 3000, 3000, 3000], float)
    img, dirs = _kurtotic_series(bvals, np.full(shape, 0.8e-3), np.zeros(shape), np.full(shape, 500.0))
    with caplog.at_level("WARNING", logger="lesiontrack"):
        maps = fit_dwi(img, bvals, dirs, CFG)
    assert maps.b_fitted == (0.0, 2000.0)
    np.testing.assert_allclose(maps.adc.data, 0.8e-3, rtol=1e-4)
    assert "every diffusion-weighted shell lies above adc_fit_b_max" in caplog.text


@pytest.mark.parametrize("scale, unit", [(1.0, "mm^2/s"), (1e3, "1e-3 mm^2/s"),
                                         (1e6, "1e-6 mm^2/s"), (1e-6, "m^2/s")])
def test_ready_adc_map_unit_is_found(scale, unit):
    rng = np.random.default_rng(3)
    adc = rng.uniform(0.6e-3, 1.0e-3, (10, 10, 10))          # brain
    adc[:3] = rng.uniform(2.8e-3, 3.2e-3, (3, 10, 10))       # CSF
    adc[-3:] = 0.0                                          # background
    data = adc * scale
    if scale == 1e6:
        data = np.round(data).astype(np.int16)              # as scanners store it
    s, u = adc_unit_scale(Image(data, np.eye(4), source="x_ADC.nii.gz"))
    assert u == unit
    np.testing.assert_allclose(data * s, adc, atol=1e-6 if scale == 1e6 else 1e-12)


def test_ready_adc_map_in_no_known_unit_is_refused():
    with pytest.raises(DWIError, match=r"x_ADC\.nii\.gz: median positive ADC 0\.03 fits no known unit"):
        adc_unit_scale(Image(np.full((4, 4, 4), 0.03), np.eye(4), source="x_ADC.nii.gz"))
    with pytest.raises(DWIError, match=r"x_ADC\.nii\.gz: the ADC map has no positive value"):
        adc_unit_scale(Image(np.zeros((4, 4, 4)), np.eye(4), source="x_ADC.nii.gz"))


def test_fit_single_shell_noisy_and_background():
    rng = np.random.default_rng(1)
    adc = np.full((8, 8, 8), 0.8e-3, np.float32)
    s0 = np.full((8, 8, 8), 1000.0, np.float32)
    s0[:2] = 0.0                                   # background
    bvals = np.array([0] + [1000] * 6, float)
    img, dirs = _series(bvals, adc, s0)
    maps = fit_dwi(img, bvals, dirs, CFG)
    np.testing.assert_allclose(maps.adc.data[2:], 0.8e-3, rtol=1e-3)
    assert np.all(maps.adc.data[:2] == 0)
    assert np.all(np.isfinite(maps.adc.data))


def test_fit_errors():
    img, dirs = _series(np.array([0, 1000, 1000.0]), np.full((3, 3, 3), 1e-3), np.ones((3, 3, 3)))
    with pytest.raises(DWIError, match="no b=0"):
        fit_dwi(img, np.array([500, 1000, 1000.0]), dirs, CFG)
    with pytest.raises(DWIError, match="b-values"):
        fit_dwi(img, np.array([0, 1000.0]), dirs[:2], CFG)
    with pytest.raises(DWIError, match="4D"):
        fit_dwi(Image(np.ones((3, 3, 3)), np.eye(4)), np.array([0.0]), np.zeros((1, 3)), CFG)


def test_read_bvals_bvecs(tmp_path):
    bval, bvec = tmp_path / "a.bval", tmp_path / "a.bvec"
    bval.write_text("0 1000 1000 1000\n")
    bvec.write_text("0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    b, v = read_bvals_bvecs(bval, bvec, 4)
    assert b.tolist() == [0, 1000, 1000, 1000] and v.shape == (4, 3)
    # one row of 3 per volume is accepted as well
    bvec.write_text("0 0 0\n1 0 0\n0 1 0\n0 0 1\n")
    assert read_bvals_bvecs(bval, bvec, 4)[1].shape == (4, 3)
    with pytest.raises(DWIError, match=r"a\.bval: 4 b-values for a series of 5"):
        read_bvals_bvecs(bval, bvec, 5)
    bval.write_text("1000 1000 1000 1000\n")
    with pytest.raises(DWIError, match="no b=0 volume"):
        read_bvals_bvecs(bval, bvec, 4)
    bval.write_text("0 1000 x 1000\n")
    with pytest.raises(DWIError, match="numbers"):
        read_bvals_bvecs(bval, bvec, 4)
    bval.write_text("0 1000 1000 1000\n")
    bvec.write_text("0 1 0\n0 0 1\n")
    with pytest.raises(DWIError, match=r"a\.bvec"):
        read_bvals_bvecs(bval, bvec, 4)
    with pytest.raises(DWIError, match="does not exist"):
        read_bvals_bvecs(tmp_path / "missing.bval", bvec, 4)
