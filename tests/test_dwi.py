"""Tests of lesiontrack.dwi: b-value/b-vector reading and the trace ADC fit."""
import numpy as np
import pytest

from lesiontrack.config import load_config
from lesiontrack.dwi import DWIError, fit_dwi, read_bvals_bvecs
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
    maps = fit_dwi(img, bvals, dirs, CFG)
    np.testing.assert_allclose(maps.adc.data, adc, rtol=1e-3)
    np.testing.assert_allclose(maps.b0.data, s0, rtol=1e-5)
    # b1000 = mean of the highest shell
    np.testing.assert_allclose(maps.b1000.data, img.data[..., 8:].mean(axis=-1), rtol=1e-5)
    assert maps.adc.data.dtype == np.float32 and maps.adc.same_grid(maps.b0)


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
