"""Procedural images of each modality for synthetic demonstrations: no patient pixels.

Every image is drawn from geometric primitives, smooth noise and speckle with numpy and
scikit-image, from a seed alone, so a demonstration never carries patient data (the property the
synthetic-demonstration defense of ``docs/design.md`` rests on). Each modality has one
generator that draws the structures a reader would expect:

* ``chest_xray`` — thorax, dark lung fields, bright mediastinum and heart, curved ribs, diaphragm.
* ``fundus`` — orange fundus with a dark vignette, a bright optic disc, branching vessels, fovea.
* ``retinal_oct`` — layered retinal bands over a choroid, a foveal dip, multiplicative speckle.
* ``colon_pathology`` — H&E texture: eosin-pink stroma, haematoxylin nuclei, white gland lumens.
* ``blood_cell`` — a smear of red cells with central pallor and one leukocyte with a purple,
  lobulated nucleus.
* ``kidney_cortex`` — grey microscopy of tubule cross-sections (rings of cells around lumens)
  and a glomerular tuft.
* ``dermatoscopy`` — skin with an irregular pigmented lesion and the dermatoscope's dark corners.
* ``breast_ultrasound`` — a speckled sector (fan) with layered tissue, a dark hypoechoic lesion
  and posterior shadowing.
* ``abdominal_ct`` — body ellipse with subcutaneous fat, liver, spleen, kidneys, aorta, vertebra
  and bowel gas on a black (air) background.

Images are float32 tensors (C, H, W) in [0, 1]; C follows the MedMNIST subset of the modality
(grey: chest X-ray, OCT, ultrasound, CT, kidney cortex; RGB: the rest)::

    image = synthesize_image("fundus", seed=3)          # (3, 64, 64)
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import torch
from skimage.draw import line_aa
from skimage.filters import gaussian
from skimage.transform import resize

from medshield.data.modalities import MODALITIES
from medshield.errors import InputError, UnknownNameError

#: Channels of each modality's synthetic image (matches its MedMNIST subset).
CHANNELS: dict[str, int] = {
    "chest_xray": 1,
    "dermatoscopy": 3,
    "retinal_oct": 1,
    "fundus": 3,
    "breast_ultrasound": 1,
    "blood_cell": 3,
    "colon_pathology": 3,
    "kidney_cortex": 1,
    "abdominal_ct": 1,
}

#: Images are drawn at this resolution at least and resized down, so structures stay smooth.
_DRAW_MIN = 96

Generator = Callable[[np.random.Generator, int], np.ndarray]


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(yy, xx) coordinates in [-1, 1], y down."""
    c = np.linspace(-1.0, 1.0, n, dtype=np.float64)
    return np.meshgrid(c, c, indexing="ij")


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise (Gaussian-filtered white noise)."""
    field = gaussian(rng.standard_normal((n, n)), sigma=sigma, preserve_range=True)
    return (field - field.mean()) / (field.std() + 1e-8)


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0
) -> np.ndarray:
    """Normalised radius of an (optionally rotated) ellipse: < 1 inside."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((u / rx) ** 2 + (v / ry) ** 2)


def _soft(r: np.ndarray, edge: float = 0.08) -> np.ndarray:
    """Soft inside-mask of a normalised radius (1 inside, 0 outside)."""
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def _blob(
    yy: np.ndarray,
    xx: np.ndarray,
    cy: float,
    cx: float,
    r: float,
    rng: np.random.Generator,
    wobble: float,
) -> np.ndarray:
    """Normalised radius of an irregular blob (radius modulated by random harmonics)."""
    theta = np.arctan2(yy - cy, xx - cx)
    radius = np.full_like(theta, r)
    for h in range(2, 6):
        radius += r * wobble / h * np.cos(h * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) / np.maximum(radius, 1e-3)


# --- generators (each returns (H, W) or (H, W, 3) float arrays, roughly in [0, 1]) ----------------


def _chest_xray(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    img = 0.05 + 0.02 * _smooth_noise(rng, n, n / 20)
    thorax = _soft(_ellipse(yy, xx, 0.12, 0.0, 1.0, 0.9 + rng.uniform(-0.04, 0.04)), 0.15)
    img = img + 0.55 * thorax
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        cx = side * rng.uniform(0.40, 0.46)
        lung = _soft(_ellipse(yy, xx, -0.02, cx, rng.uniform(0.62, 0.70), 0.30), 0.25)
        lung *= yy < 0.55 + 0.12 * np.cos((xx - cx) * 3)  # diaphragm dome
        lungs = np.maximum(lungs, lung)
    img = img - 0.38 * lungs
    # ribs: bright arcs over the lung fields, curving downwards laterally
    ribs = np.zeros_like(img)
    for i in range(int(rng.integers(6, 8))):
        yc = -0.8 + i * 0.2 + rng.uniform(-0.015, 0.015)
        curve = yc + 0.12 * np.abs(xx) + 0.3 * xx**2
        ribs = np.maximum(ribs, np.exp(-(((yy - curve) / 0.045) ** 2)))
    img = img + 0.12 * ribs * lungs
    mediastinum = _soft(_ellipse(yy, xx, 0.0, 0.0, 0.8, 0.14), 0.3)
    heart = _soft(_ellipse(yy, xx, 0.32, 0.12, 0.28, 0.26, angle=0.3), 0.3)
    img = img + 0.2 * np.maximum(mediastinum, heart) * thorax
    img = img + 0.05 * (np.abs(xx) < 0.05) * thorax  # spine shadow
    img = gaussian(img, sigma=n / 120, preserve_range=True)
    return img + 0.015 * rng.standard_normal(img.shape)


def _draw_tree(
    canvas: np.ndarray,
    rng: np.random.Generator,
    y: float,
    x: float,
    angle: float,
    length: float,
    width: float,
    depth: int,
) -> None:
    """Draw a branching vessel tree into ``canvas`` (pixel coordinates)."""
    n = canvas.shape[0]
    steps = 4
    for _ in range(steps):
        angle += rng.normal(0, 0.18)
        ny = y + np.sin(angle) * length / steps
        nx = x + np.cos(angle) * length / steps
        for off in np.linspace(-width / 2, width / 2, max(1, int(round(width)))):
            oy, ox = np.cos(angle) * off, -np.sin(angle) * off
            rr, cc, val = line_aa(
                int(np.clip(y + oy, 0, n - 1)),
                int(np.clip(x + ox, 0, n - 1)),
                int(np.clip(ny + oy, 0, n - 1)),
                int(np.clip(nx + ox, 0, n - 1)),
            )
            canvas[rr, cc] = np.maximum(canvas[rr, cc], val)
        y, x = ny, nx
    if depth > 0:
        for turn in (-1, 1):
            _draw_tree(
                canvas,
                rng,
                y,
                x,
                angle + turn * rng.uniform(0.3, 0.7),
                length * rng.uniform(0.6, 0.8),
                max(1.0, width * 0.7),
                depth - 1,
            )


def _fundus(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    r = np.hypot(yy, xx)
    field = _soft(r / 0.94, 0.03)
    vignette = np.clip(1.0 - 0.75 * r**2.2, 0.0, 1.0)
    texture = 1.0 + 0.06 * _smooth_noise(rng, n, n / 25)
    base = np.array([0.85, 0.38, 0.16]) + rng.uniform(-0.05, 0.05, 3)
    img = base[None, None, :] * (vignette * texture)[..., None]
    side = rng.choice([-1.0, 1.0])
    dy, dx = rng.uniform(-0.08, 0.08), side * rng.uniform(0.38, 0.48)
    disc = _soft(_ellipse(yy, xx, dy, dx, 0.15, 0.13), 0.25)
    img = img * (1 - disc[..., None]) + np.array([1.0, 0.9, 0.6])[None, None, :] * disc[..., None]
    fovea = np.exp(-(((yy - dy) ** 2 + (xx + side * 0.25) ** 2) / 0.02))
    img = img * (1 - 0.35 * fovea[..., None])
    vessels = np.zeros((n, n))
    py, px = (dy + 1) / 2 * (n - 1), (dx + 1) / 2 * (n - 1)
    # four arcades leave the disc: two arching toward the fovea, two toward the nasal side
    for vertical in (-1.0, 1.0):
        for lean, scale in ((side, 0.34), (-side, 0.22)):  # (temporal, nasal)
            angle = vertical * (np.pi / 2 + lean * rng.uniform(0.45, 0.75))
            _draw_tree(vessels, rng, py, px, angle, n * scale, n / 60 + 1.5, depth=3)
    vessels = gaussian(vessels, sigma=n / 200, preserve_range=True)
    vessel_colour = np.array([0.45, 0.06, 0.04])
    img = (
        img * (1 - 0.8 * vessels[..., None])
        + 0.8 * vessels[..., None] * vessel_colour * vignette[..., None]
    )
    return img * field[..., None] + 0.01 * rng.standard_normal((n, n, 3))


def _retinal_oct(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    tilt = rng.uniform(-0.08, 0.08)
    centre = rng.uniform(-0.2, 0.2)
    surface = (
        -0.5
        + tilt * xx
        + 0.04 * np.sin(xx * rng.uniform(1.5, 3) + rng.uniform(0, 6))
        + 0.14 * np.exp(-(((xx - centre) / 0.18) ** 2))  # foveal pit
    )
    depth = yy - surface
    # (top offset, thickness, reflectivity) of the retinal layers, inner to outer
    layers = [
        (0.000, 0.080, 0.85),  # nerve fibre layer
        (0.080, 0.112, 0.45),  # ganglion cell / inner plexiform
        (0.192, 0.080, 0.25),  # inner nuclear
        (0.272, 0.064, 0.5),  # outer plexiform
        (0.336, 0.144, 0.15),  # outer nuclear
        (0.480, 0.032, 0.7),  # ellipsoid zone
        (0.528, 0.064, 0.95),  # RPE
    ]
    img = np.full_like(yy, 0.04)
    for top, thick, refl in layers:
        if top < 0.27:  # inner layers thin out in the foveal pit
            thick = thick * (1 - 0.6 * np.exp(-(((xx - centre) / 0.15) ** 2)))
            top = top * (1 - 0.6 * np.exp(-(((xx - centre) / 0.15) ** 2)))
        band = (depth >= top) & (depth < top + thick)
        img = np.where(band, refl, img)
    choroid = depth >= 0.59
    img = np.where(choroid, 0.45 * np.exp(-(depth - 0.59) / 0.3), img)
    img = gaussian(img, sigma=n / 160, preserve_range=True)
    speckle = rng.gamma(shape=4.0, scale=0.25, size=img.shape)
    return img * speckle


def _colon_pathology(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    eosin = np.array([0.93, 0.55, 0.75]) + rng.uniform(-0.04, 0.04, 3)
    haem = np.array([0.33, 0.18, 0.52]) + rng.uniform(-0.04, 0.04, 3)
    density = 0.75 + 0.2 * _smooth_noise(rng, n, n / 10)
    img = np.ones((n, n, 3)) * 0.97
    img = img * (1 - density[..., None] * 0.9) + eosin * density[..., None] * 0.9
    fibres = _smooth_noise(rng, n, n / 60)
    img = img * (1 + 0.08 * fibres[..., None])
    nuclei = np.zeros((n, n))

    def nucleus(cy: float, cx: float, scale: float) -> None:
        r = _ellipse(
            yy,
            xx,
            cy,
            cx,
            scale * rng.uniform(0.8, 1.2),
            scale * rng.uniform(0.55, 0.8),
            rng.uniform(0, np.pi),
        )
        np.maximum(nuclei, _soft(r, 0.4), out=nuclei)

    for _ in range(int(rng.integers(2, 4))):  # glands: a white lumen ringed by epithelial nuclei
        cy, cx = rng.uniform(-0.65, 0.65, 2)
        rad = rng.uniform(0.14, 0.24)
        lumen = _soft(_blob(yy, xx, cy, cx, rad, rng, 0.25), 0.2)
        img = img * (1 - lumen[..., None]) + 0.97 * lumen[..., None]
        count = int(2 * np.pi * rad * 1.3 / 0.1)
        for a in np.linspace(0, 2 * np.pi, count, endpoint=False):
            nucleus(cy + 1.3 * rad * np.sin(a), cx + 1.3 * rad * np.cos(a), 0.06)
    for _ in range(int(rng.integers(25, 45))):  # scattered stromal and immune-cell nuclei
        cy, cx = rng.uniform(-1, 1, 2)
        nucleus(cy, cx, rng.uniform(0.04, 0.06))
    img = img * (1 - 0.85 * nuclei[..., None]) + 0.85 * nuclei[..., None] * haem
    return gaussian(img, sigma=n / 250, channel_axis=-1) + 0.015 * rng.standard_normal((n, n, 3))


def _blood_cell(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    background = np.array([0.92, 0.88, 0.80]) + rng.uniform(-0.03, 0.03, 3)
    img = np.ones((n, n, 3)) * background
    rbc_colour = np.array([0.88, 0.55, 0.52])
    wbc_y, wbc_x = rng.uniform(-0.15, 0.15, 2)
    for _ in range(int(rng.integers(12, 20))):
        for _try in range(20):
            cy, cx = rng.uniform(-1.05, 1.05, 2)
            if np.hypot(cy - wbc_y, cx - wbc_x) > 0.5:
                break
        rad = rng.uniform(0.16, 0.21)
        r = _ellipse(yy, xx, cy, cx, rad, rad * rng.uniform(0.9, 1.1), rng.uniform(0, np.pi))
        cell = _soft(r, 0.15)
        pallor = 0.35 * np.exp(-(r**2) / 0.12)  # central pallor of a biconcave disc
        colour = rbc_colour * (1 - pallor[..., None]) + background * pallor[..., None]
        img = img * (1 - cell[..., None]) + colour * cell[..., None]
    cyto = _soft(_ellipse(yy, xx, wbc_y, wbc_x, 0.36, 0.34), 0.12)
    img = img * (1 - cyto[..., None]) + np.array([0.80, 0.74, 0.86]) * cyto[..., None]
    nucleus = np.zeros((n, n))
    for _ in range(int(rng.integers(2, 5))):  # lobulated nucleus
        oy, ox = rng.uniform(-0.14, 0.14, 2)
        lobe = _soft(_ellipse(yy, xx, wbc_y + oy, wbc_x + ox, 0.12, 0.09, rng.uniform(0, np.pi)))
        nucleus = np.maximum(nucleus, lobe)
    stain = np.array([0.36, 0.16, 0.55]) + rng.uniform(-0.03, 0.03, 3)
    img = img * (1 - nucleus[..., None]) + stain * nucleus[..., None]
    img = gaussian(img, sigma=n / 200, channel_axis=-1)
    return img + 0.01 * rng.standard_normal((n, n, 3))


def _kidney_cortex(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    img = 0.12 + 0.03 * _smooth_noise(rng, n, n / 15)
    cells = np.zeros((n, n))
    for _ in range(int(rng.integers(4, 7))):  # tubule cross-sections
        cy, cx = rng.uniform(-0.8, 0.8, 2)
        rad = rng.uniform(0.18, 0.3)
        r = _ellipse(yy, xx, cy, cx, rad, rad * rng.uniform(0.8, 1.2), rng.uniform(0, np.pi))
        wall = np.exp(-(((r - 0.75) / 0.18) ** 2))  # epithelial ring around a dark lumen
        cells = np.maximum(cells, 0.55 * wall)
        for k in range(int(rng.integers(6, 10))):  # nuclei in the ring
            a = 2 * np.pi * k / 8 + rng.uniform(-0.2, 0.2)
            ny, nx = cy + 0.75 * rad * np.sin(a), cx + 0.75 * rad * np.cos(a)
            cells = np.maximum(cells, 0.9 * _soft(_ellipse(yy, xx, ny, nx, 0.04, 0.04), 0.5))
    gy, gx = rng.uniform(-0.5, 0.5, 2)
    tuft = _soft(_ellipse(yy, xx, gy, gx, 0.25, 0.25), 0.2)  # glomerulus
    tuft_texture = 0.5 + 0.3 * np.clip(_smooth_noise(rng, n, n / 50), -1, 1)
    cells = np.maximum(cells, tuft * tuft_texture)
    img = img + cells
    img = gaussian(img, sigma=n / 150, preserve_range=True)
    return img + 0.03 * rng.standard_normal(img.shape)


def _dermatoscopy(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    skin = np.array([0.88, 0.66, 0.56]) + rng.uniform(-0.06, 0.04, 3)
    img = np.ones((n, n, 3)) * skin * (1 + 0.04 * _smooth_noise(rng, n, n / 30))[..., None]
    cy, cx = rng.uniform(-0.15, 0.15, 2)
    r = _blob(yy, xx, cy, cx, rng.uniform(0.38, 0.52), rng, 0.35)
    lesion = _soft(r, 0.3)
    brown = np.array([0.45, 0.26, 0.16]) + rng.uniform(-0.05, 0.05, 3)
    dark = np.array([0.22, 0.12, 0.08])
    core = np.clip(1.2 - r, 0, 1)
    network = 0.5 + 0.5 * np.sin(xx * 40 + _smooth_noise(rng, n, n / 40) * 2) * np.sin(yy * 40)
    colour = brown * (1 - core[..., None]) + dark * core[..., None]
    colour = colour * (1 - 0.15 * network[..., None])
    img = img * (1 - lesion[..., None]) + colour * lesion[..., None]
    for _ in range(int(rng.integers(0, 4))):  # a few hairs
        hair = np.zeros((n, n))
        y0, x0, y1, x1 = rng.integers(0, n, 4)
        rr, cc, val = line_aa(y0, x0, y1, x1)
        hair[rr, cc] = val
        img = img * (1 - 0.6 * gaussian(hair, sigma=0.7)[..., None])
    corners = _soft(np.hypot(yy, xx) / 1.22, 0.1)  # the dermatoscope's round field of view
    img = img * corners[..., None]
    return gaussian(img, sigma=n / 200, channel_axis=-1) + 0.01 * rng.standard_normal((n, n, 3))


def _breast_ultrasound(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    apex_y = -1.15
    rad = np.hypot(yy - apex_y, xx)
    theta = np.arctan2(xx, yy - apex_y)
    half = rng.uniform(0.55, 0.65)
    fan = (np.abs(theta) < half) & (rad > 0.25) & (rad < 2.1)
    depth = np.clip((rad - 0.25) / 1.85, 0, 1)
    tissue = 0.55 + 0.18 * np.sin(depth * rng.uniform(10, 16) + _smooth_noise(rng, n, n / 12))
    tissue = tissue * (1 - 0.45 * depth)  # attenuation with depth
    ly, lx = rng.uniform(0.05, 0.35), rng.uniform(-0.35, 0.35)
    r = _blob(yy, xx, ly, lx, rng.uniform(0.18, 0.3), rng, 0.25)
    lesion = _soft(r, 0.3)
    shadow = (yy > ly) & (np.abs(xx - lx) < 0.2 * (1 + (yy - ly)))
    tissue = tissue * (1 - 0.85 * lesion) * np.where(shadow & (lesion < 0.5), 0.55, 1.0)
    speckle = rng.rayleigh(scale=0.8, size=(n, n))
    img = gaussian(tissue * speckle, sigma=n / 180, preserve_range=True)
    return np.where(fan, img, 0.0)


def _abdominal_ct(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = _grid(n)
    img = np.zeros_like(yy)
    ry, rx = rng.uniform(0.62, 0.72), rng.uniform(0.85, 0.93)
    body = _soft(_ellipse(yy, xx, 0.05, 0.0, ry, rx), 0.03)
    inner = _soft(_ellipse(yy, xx, 0.05, 0.0, ry - 0.08, rx - 0.09), 0.05)
    img = img + 0.28 * body + 0.2 * inner  # subcutaneous fat darker than muscle/organs
    texture = 1 + 0.05 * _smooth_noise(rng, n, n / 30)
    organs = [
        (-0.05, -0.38, 0.38, 0.33, 0.62),  # liver (patient's right = image left)
        (-0.05, 0.5, 0.22, 0.16, 0.58),  # spleen
        (0.3, -0.33, 0.13, 0.09, 0.66),  # right kidney
        (0.3, 0.33, 0.13, 0.09, 0.66),  # left kidney
        (0.05, 0.1, 0.12, 0.2, 0.52),  # stomach / pancreas region
    ]
    for cy, cx, oy, ox, val in organs:
        cy, cx = cy + rng.uniform(-0.03, 0.03), cx + rng.uniform(-0.03, 0.03)
        m = _soft(_ellipse(yy, xx, cy, cx, oy, ox, rng.uniform(-0.3, 0.3)), 0.15) * inner
        img = img * (1 - m) + val * m
    for _ in range(int(rng.integers(2, 5))):  # bowel gas
        cy, cx = rng.uniform(-0.35, 0.15), rng.uniform(-0.2, 0.4)
        gas = _soft(_ellipse(yy, xx, cy, cx, 0.05, 0.06), 0.3) * inner
        img = img * (1 - gas)
    aorta = _soft(_ellipse(yy, xx, 0.28, 0.06, 0.06, 0.06), 0.2)
    img = np.maximum(img, 0.75 * aorta)
    vertebra = _soft(_ellipse(yy, xx, 0.5, 0.0, 0.12, 0.13), 0.15)
    cortex = np.exp(-(((_ellipse(yy, xx, 0.5, 0.0, 0.12, 0.13) - 0.95) / 0.12) ** 2))
    img = np.maximum(img, 0.82 * vertebra + 0.15 * cortex)
    img = img * texture
    img = gaussian(img, sigma=n / 200, preserve_range=True)
    return img + 0.02 * rng.standard_normal(img.shape) * body


_GENERATORS: dict[str, Generator] = {
    "chest_xray": _chest_xray,
    "dermatoscopy": _dermatoscopy,
    "retinal_oct": _retinal_oct,
    "fundus": _fundus,
    "breast_ultrasound": _breast_ultrasound,
    "blood_cell": _blood_cell,
    "colon_pathology": _colon_pathology,
    "kidney_cortex": _kidney_cortex,
    "abdominal_ct": _abdominal_ct,
}
assert set(_GENERATORS) == set(MODALITIES), "one generator per modality"


def _check_modality(modality: str) -> str:
    if modality not in _GENERATORS:
        raise UnknownNameError(
            f"unknown modality {modality!r}; synthetic images exist for: {', '.join(_GENERATORS)}"
        )
    return modality


def synthesize_image(modality: str, seed: int, size: int = 64) -> torch.Tensor:
    """A procedurally drawn image of ``modality``: float32 (C, size, size) in [0, 1].

    Deterministic given ``(modality, seed, size)``; different seeds give different images.

    Args:
        modality: one of :data:`medshield.data.modalities.MODALITIES` (e.g. ``"fundus"``).
        seed: any non-negative integer.
        size: output side in pixels (8 to 1024).

    Raises:
        UnknownNameError: unknown modality.
        InputError: a negative or non-integer seed, or a size outside [8, 1024].
    """
    _check_modality(modality)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 1024:
        raise InputError(f"image size must be an integer in [8, 1024], got {size!r}")
    salt = zlib.crc32(modality.encode())
    rng = np.random.default_rng([int(seed), salt])
    n = max(int(size), _DRAW_MIN)
    array = np.asarray(_GENERATORS[modality](rng, n), dtype=np.float64)
    if array.ndim == 2:
        array = array[..., None]
    if n != size:
        array = resize(array, (size, size, array.shape[-1]), order=1, anti_aliasing=True)
    array = np.clip(array, 0.0, 1.0).astype(np.float32)
    assert array.shape[-1] == CHANNELS[modality]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def synthesize_batch(modality: str, seeds: list[int], size: int = 64) -> torch.Tensor:
    """Several images of one modality: (N, C, size, size)."""
    if not seeds:
        raise InputError("synthesize_batch needs at least one seed")
    return torch.stack([synthesize_image(modality, s, size) for s in seeds])
