"""TLP and PAMR against direct transcriptions of docs/pearl.md §3 and docs/methods.md §4.1."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pearl.refine.pamr import pamr
from pearl.refine.tlp import TLPConfig, pooling_strides, text_affinity, tlp

from .reference import tlp as ref

H, W, Q = 5, 6, 3


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(1, Q, H, W, generator=g, dtype=torch.float64) * 3
    guide = torch.randn(1, 3, H, W, generator=g, dtype=torch.float64)
    affinity = torch.softmax(torch.randn(Q, Q, generator=g, dtype=torch.float64), dim=1)
    return logits, guide, affinity


# each paper variant of docs/pearl.md §6 that changes the system (switch, constants that make it bite)
VARIANTS = [({}, {}), ({"quadform": "full"}, {}), ({"softmax_temp": 40.0}, {}), ({"grad_norm": "none"}, {}),
            ({"edge_clamp": False}, {"kappa": 0.1}), ({"lambda_": 0.5, "kappa": 2.0, "eps": 0.2, "tau": 3.0}, {})]


@pytest.mark.parametrize("switch, context", VARIANTS, ids=lambda v: ",".join(v) or "-")
def test_tlp_converges_to_the_dense_solution(switch, context):
    logits, guide, affinity = _problem()
    cfg = TLPConfig(grid=80, cg_iters=300, **context, **switch)
    matrix, rhs = ref.dense_system(logits, guide, affinity, cfg)
    exact = np.linalg.solve(matrix, rhs.T).T.reshape(Q, H, W)
    out = tlp(logits, guide, affinity, cfg)
    assert np.allclose(out[0].numpy(), exact, atol=1e-8)
    if switch:  # and the switch does change TLP's result
        without = ref.dense_system(logits, guide, affinity, TLPConfig(grid=80, cg_iters=300, **context))
        assert not np.allclose(exact, np.linalg.solve(without[0], without[1].T).T.reshape(Q, H, W), atol=1e-6)


def test_released_25_steps_equal_hand_run_cg():
    logits, guide, affinity = _problem(1)
    matrix, rhs = ref.dense_system(logits, guide, affinity)
    expected = ref.conjugate_gradient(matrix, rhs, logits[0].numpy().reshape(Q, -1), 25).reshape(Q, H, W)
    out = tlp(logits, guide, affinity)
    assert np.allclose(out[0].numpy(), expected, atol=1e-10)
    few = tlp(logits, guide, affinity, TLPConfig(cg_iters=2))
    assert not np.allclose(few[0].numpy(), expected, atol=1e-6)


def test_full_equals_diag_exactly_when_g_is_diagonal():
    logits, guide, affinity = _problem(2)
    diagonal = torch.diag(torch.diagonal(affinity))
    same_a = tlp(logits, guide, diagonal, TLPConfig(quadform="diag"))
    same_b = tlp(logits, guide, diagonal, TLPConfig(quadform="full"))
    assert torch.allclose(same_a, same_b, atol=1e-12)
    differ = tlp(logits, guide, affinity, TLPConfig(quadform="full")) - tlp(logits, guide, affinity)
    assert differ.abs().max() > 1e-6


@pytest.mark.parametrize("hw, grid, strides", [((375, 500), 80, (5, 6)), ((333, 500), 80, (4, 6)),
                                               ((480, 640), 80, (6, 8)), ((512, 683), 80, (6, 9)),
                                               ((1024, 2048), 224, (5, 9)), ((200, 60), 80, (2, 1)),
                                               ((40, 40), 80, (1, 1))])
def test_pooling_strides_table(hw, grid, strides):
    assert pooling_strides(*hw, grid) == strides  # 200/80 = 2.5 rounds half to even → 2


def test_pooled_tlp_keeps_the_full_size():
    g = torch.Generator().manual_seed(3)
    logits, guide = torch.rand(1, 4, 37, 53, generator=g), torch.randn(1, 3, 37, 53, generator=g)
    affinity = text_affinity(torch.randn(4, 8, generator=g))
    for pool in ("int_stride", "adaptive"):
        out = tlp(logits, guide, affinity, TLPConfig(grid=10, pool=pool))
        assert out.shape == logits.shape and torch.isfinite(out).all()


def test_text_affinity_formula():
    protos = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=1)
    g = text_affinity(protos).double()
    s1 = torch.softmax(protos @ protos.T / 0.5, dim=1) + 10 * torch.eye(5, dtype=torch.float64)
    assert torch.allclose(g, s1 / (s1.sum(1, keepdim=True) + 1e-6), atol=1e-6)
    assert torch.allclose(g.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-5)


def _reference_pamr(image, logits, iters, dilations):
    """Per-pixel loops of docs/methods.md §4.1."""
    img, lab = image[0].numpy(), logits[0].numpy().copy()
    _, h, w = img.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    clamp = lambda y, x: (min(max(y, 0), h - 1), min(max(x, 0), w - 1))
    weights = np.zeros((h, w, len(offsets)))
    for y in range(h):
        for x in range(w):
            samples = np.array([img[:, clamp(y + oy, x + ox)[0], clamp(y + oy, x + ox)[1]] for oy, ox in offsets])
            sigma = samples.std(axis=0, ddof=1)
            logits_n = []
            for oy, ox in offsets:
                if oy == 0 and ox == 0:
                    logits_n.append(None)
                    continue
                yy, xx = clamp(y + oy, x + ox)
                logits_n.append(-np.mean(np.abs(img[:, y, x] - img[:, yy, xx]) / (1e-8 + 0.1 * sigma)))
            vals = np.array([v for v in logits_n if v is not None])
            soft = np.exp(vals - vals.max())
            soft /= soft.sum()
            weights[y, x, [i for i, v in enumerate(logits_n) if v is not None]] = soft
    for _ in range(iters):
        new = np.zeros_like(lab)
        for y in range(h):
            for x in range(w):
                for n, (oy, ox) in enumerate(offsets):
                    if weights[y, x, n]:
                        yy, xx = clamp(y + oy, x + ox)
                        new[:, y, x] += weights[y, x, n] * lab[:, yy, xx]
        lab = new
    return lab


def test_pamr_matches_per_pixel_reference():
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 7, 9, generator=g, dtype=torch.float64)
    logits = torch.rand(1, 2, 7, 9, generator=g, dtype=torch.float64)
    out = pamr(image.double(), logits, iters=3, dilations=(1, 2))
    assert np.allclose(out[0].numpy(), _reference_pamr(image, logits, 3, (1, 2)), atol=1e-5)


def test_newton_schulz_is_the_released_iteration_to_float64_precision():
    import numpy as np

    from pearl.procrustes import polar_newton_schulz
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 5)) @ np.diag([1.0, 0.3, 0.05, 1e-3, 1e-5])  # weak directions: the +1e-6·I matters
    gram = m.T @ m
    a = max(np.linalg.norm(gram), 1e-6)
    y, w, eye = gram / a + 1e-6 * np.eye(5), np.eye(5), np.eye(5)
    for _ in range(5):
        t = 0.5 * (3 * eye - w @ y)
        y, w = y @ t, t @ w
    expected = m @ w / np.sqrt(a)
    ours = polar_newton_schulz(torch.from_numpy(m), iters=5).numpy()
    assert np.abs(ours - expected).max() < 1e-12


def test_conjugate_gradient_starts_from_z():
    from pearl.refine.tlp import conjugate_gradient
    torch.manual_seed(0)
    z, rho = torch.randn(1, 3, 4, 5), torch.rand(1, 1, 4, 5) + 0.1
    w_h, w_v = torch.rand(1, 4, 4), torch.rand(1, 3, 5)
    assert torch.equal(conjugate_gradient(rho, z, w_h, w_v, tau=1.0, iters=0), z)  # no step taken: X0 = Z


def test_tlp_pools_by_integer_stride_and_upsamples_without_corner_alignment():
    from pearl.refine.tlp import TLPConfig, tlp
    torch.manual_seed(1)
    logits, guide = torch.randn(1, 3, 40, 60), torch.randn(1, 3, 40, 60)
    cfg = TLPConfig(grid=10, cg_iters=0)  # CG from Z with no step: TLP reduces to pool → upsample
    stride_h, stride_w = round(40 / 10), round(60 / 10)  # 4 and 6
    pooled = logits.reshape(1, 3, 40 // stride_h, stride_h, 60 // stride_w, stride_w).mean(dim=(3, 5))
    expected = torch.nn.functional.interpolate(pooled, size=(40, 60), mode="bilinear", align_corners=False)
    out = tlp(logits, guide, torch.eye(3), cfg)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("source, size, grid", [((56, 336, 448), (375, 500), 80), ((150, 336, 448), (512, 683), 80),
                                                ((19, 37, 61), (1024, 2048), 224), ((3, 20, 30), (41, 67), 10)])
def test_pooling_before_the_resize_equals_resizing_then_pooling(source, size, grid):
    from pearl.refine.tlp import pool_resized
    torch.manual_seed(0)
    logits = torch.randn(1, *source)
    stride = (max(1, round(size[0] / grid)), max(1, round(size[1] / grid)))
    expected = F.avg_pool2d(F.interpolate(logits, size=size, mode="bilinear", align_corners=False), stride, stride)
    pooled = pool_resized(logits, size, TLPConfig(grid=grid))
    assert pooled.shape == expected.shape
    assert torch.allclose(pooled, expected, atol=2e-6, rtol=0)


def test_segmentor_tlp_from_the_fused_logits_gives_the_released_path_result(tiny_model, tokenizer, photos,
                                                                             monkeypatch):
    import pearl
    from pearl.refine.tlp import TLPRefiner
    for method, dataset in (("pearl", "voc21"), ("pearl", "ade20k"), ("naclip", "ade20k")):
        params = pearl.protocol(method, dataset) | {"resize_short": 112}
        seg = pearl.Segmentor(tiny_model, ["sky, wall", "cat", "cup", "table"], method=method, tlp=True,
                              tokenizer=tokenizer, **params)
        assert seg.refiner("tlp").pools_before_resizing(seg.fuse(*_fused_inputs(seg, photos["chelsea"])))
        fast = seg.predict(photos["chelsea"])
        with monkeypatch.context() as patch:
            patch.setattr(TLPRefiner, "pools_before_resizing", lambda self, logits: False)
            released = seg.predict(photos["chelsea"])  # the resize to the original size, then TLP's own pooling
        assert (fast.labels == released.labels).float().mean() >= 0.999
        assert torch.allclose(fast.logits, released.logits, atol=1e-5, rtol=0), method
        assert torch.allclose(fast.probs, released.probs, atol=1e-4, rtol=0), method


def _fused_inputs(seg, image):
    item = seg.prepare_image(image)
    crops = torch.stack([seg.crop(item, window) for window in item.windows])
    return item, list(seg.window_logits(seg.tower.trunk(crops), None)), {}
