"""Label propagation (pearl/propagation.py) and LPOSS's pieces against hand-computed values and
independent solvers (numpy, scipy, scikit-image); the whole LPOSS flow is in test_reference_pipeline.py."""
import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from skimage.color import rgb2lab

import pearl
from pearl.errors import ConfigError
from pearl.methods.lposs import patch_centres
from pearl.preprocess import Window
from pearl.propagation import conjugate_gradient, knn_affinity, propagate, symmetric_normalised
from pearl.refine.lposs_plus import neighbour_offsets, normalised_stencil, rgb_to_lab, stencil_product

from .reference import lposs as lposs_ref


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T + n * torch.eye(n, dtype=torch.float64)


def test_conjugate_gradient_is_scipys_step_for_step_and_solves_the_system():
    a = _spd(12)
    b = torch.randn(12, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 3):  # before convergence: each column equals scipy's own CG after as many steps
        ours = conjugate_gradient(lambda x: a @ x, b, steps, 1e-6)
        theirs = np.stack([spla.cg(a.numpy(), column, rtol=1e-6, maxiter=steps)[0] for column in b.T.numpy()], 1)
        assert np.allclose(ours.numpy(), theirs, atol=1e-12)
    solved = conjugate_gradient(lambda x: a @ x, b, 100, 1e-12)
    assert torch.allclose(solved, torch.linalg.solve(a, b), atol=1e-9)


def test_conjugate_gradient_stops_each_column_at_its_tolerance_and_keeps_a_zero_column():
    b = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    # the identity is solved in one step; continuing would divide 0 by 0
    x = conjugate_gradient(lambda v: v, b, 10, 1e-6)
    assert torch.equal(x, b)


def test_knn_affinity_by_hand():
    # three unit features, two neighbours each (itself first), positions 0, 3, 4 pixels along x
    features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    positions = torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 4.0]])
    dense = knn_affinity(features, positions, k=2, gamma=2.0, sigma=0.5, distance_power=1.0).to_dense()
    expected = torch.tensor([[1.0, 0.36 * np.exp(-1.5), 0.0],
                             [0.0, 1.0, 0.64 * np.exp(-0.5)],
                             [0.0, 0.64 * np.exp(-0.5), 1.0]])
    assert torch.allclose(dense, expected.float(), atol=1e-6)


def test_symmetric_normalisation_by_hand():
    # W + Wᵀ with the diagonal dropped; node 2 has no edge (its degree 0 is taken as 1)
    w = torch.tensor([[5.0, 1.0, 0.0], [3.0, 2.0, 0.0], [0.0, 0.0, 7.0]]).to_sparse()
    normalised = symmetric_normalised(w).to_dense()
    expected = torch.tensor([[0.0, 4.0 / 4.0, 0.0], [4.0 / 4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(normalised, expected)
    assert torch.allclose(propagate(symmetric_normalised(w), torch.eye(3), 0.5, 50, 1e-12).float(),
                          torch.linalg.inv(torch.eye(3) - 0.5 * expected), atol=1e-6)


def test_patch_centres_are_in_input_pixels_of_each_window():
    centres = patch_centres([Window(0, 32, 0, 32), Window(16, 48, 40, 72)], (2, 2), 16, torch.device("cpu"))
    assert centres.tolist() == [[8, 8], [8, 24], [24, 8], [24, 24], [24, 48], [24, 64], [40, 48], [40, 64]]


def test_lab_is_scikit_images(photos):
    rgb = torch.from_numpy(photos["chelsea"][::4, ::4] / 255.0).float().permute(2, 0, 1)
    expected = rgb2lab(rgb.permute(1, 2, 0).double().numpy())
    assert np.allclose(rgb_to_lab(rgb).permute(1, 2, 0).numpy(), expected, atol=2e-3)


@pytest.mark.parametrize("window", [3, 5])
def test_pixel_stencil_is_the_released_sparse_graph(photos, window):
    """Wn's product as a stencil equals the sparse matrix the released code builds (the reference's
    scipy graph, Wn = (I − L)/α), borders included."""
    rgb = photos["coffee"][::25, ::25] / 255.0  # 16×24
    lab = rgb_to_lab(torch.from_numpy(rgb).float().permute(2, 0, 1)) / torch.tensor([100.0, 128, 128])[:, None, None]
    offsets = neighbour_offsets(window)
    stencil = normalised_stencil(lab, offsets, 0.05).double()
    laplacian = lposs_ref.pixel_laplacian(rgb, tau=0.05, neigh=window // 2, alpha=0.5)
    dense = (np.eye(rgb.shape[0] * rgb.shape[1]) - laplacian.toarray()) / 0.5
    x = torch.randn(rgb.shape[0] * rgb.shape[1], 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert np.allclose(stencil_product(stencil, offsets, x).numpy(), dense @ x.numpy(), atol=1e-5)


def test_lposs_caps_k_at_the_patch_count(tiny_model, tokenizer, photos):
    """A whole 48×72 image has 54 patches of 8 pixels: k = 400 (the released default) is every patch, as k = 54."""
    vision = pearl.load_vfm("tiny")
    params = dict(resize_short=48, slide_crop=0, logit_scale=100)
    outs = [pearl.Segmentor(tiny_model, ["cat", "cup"], method="lposs", tokenizer=tokenizer, vfm=vision, lposs_k=k,
                            **params).predict(photos["coffee"]) for k in (400, 54)]
    assert torch.equal(outs[0].logits, outs[1].logits)


def test_lposs_without_a_vision_model_names_the_one_to_load(tiny_model, tokenizer):
    with pytest.raises(ConfigError, match=r"method=lposs needs a second vision model: .*load_vfm\('dino_b16'\)"):
        pearl.Segmentor(tiny_model, ["cat"], method="lposs", tokenizer=tokenizer)


def test_lposs_plus_refines_any_method_at_the_input_size(tiny_model, tokenizer, photos):
    """LPOSS+ is a refiner: on NACLIP's fused logits it changes them (a random model's are not smooth),
    and a whole-image prediction (logits at the patch grid) is resized to the input size first."""
    for crop in (64, 0):
        plain, plus = [pearl.Segmentor(tiny_model, ["cat", "cup", "table"], method="naclip", tokenizer=tokenizer,
                                       resize_short=64, slide_crop=crop, slide_stride=32, lposs_plus=on)
                       .predict(photos["chelsea"]) for on in (False, True)]
        assert plain.logits.shape == plus.logits.shape and torch.isfinite(plus.logits).all()
        assert not torch.allclose(plain.logits, plus.logits)


def test_a_stopped_column_stays_put_however_many_steps_follow():
    """A column that meets its tolerance after one step (residual ~1e7, inside 0.9·‖b‖) keeps that step's
    x = (bᵀb / bᵀAb)·b while another column (a rotation: it never converges) goes on for 300 steps:
    a stopped column's search direction must not keep growing until it overflows into its x."""
    a = torch.diag(torch.tensor([1.0, 100.0, 3.0], dtype=torch.float64))
    rotation = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1e8, 1.0], [1e5, 1.0], [0.0, 1.0]], dtype=torch.float64)
    x = conjugate_gradient(lambda v: torch.stack([a @ v[:, 0], rotation @ v[:, 1]], 1), b, 300, 0.9)
    first = b[:, 0]
    assert torch.allclose(x[:, 0], (first @ first) / (first @ a @ first) * first, rtol=1e-12)
