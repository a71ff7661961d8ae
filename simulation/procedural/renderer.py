"""Vectorized perspective renderer of procedural streets with per-pixel labels.

Geometry is ray-cast per pixel for the whole batch at once: a pinhole camera with
pitch, yaw, roll and lateral offset looks down a road whose centre line bends with
constant curvature. Every pixel's ray is intersected with the ground plane (road,
lane markings, sidewalks, verges) and with the two frontage planes (buildings with
windows, tree lines, fences); the nearest hit wins. Upright objects are sprites
drawn with a z-buffer (:mod:`.sprites`). Lighting follows the sun and clouds; fog
fades with depth; rain adds streaks and a wet, reflective road; at night lamps,
vehicle lights and windows glow. Finally the style's camera pipeline and the
randomized sensor effects act on the image.

Shapes: ``N`` frames of ``H x W`` pixels; images ``(N, 3, H, W)`` float in [0, 1],
masks ``(N, H, W) uint8`` taxonomy indices with 255 = ignore.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from simulation.procedural import camera_effects, fused, kernels, textures
from simulation.procedural.kernels import (
    M_BUILDING,
    M_FENCE,
    M_MARK,
    M_ROAD,
    M_SIDEWALK,
    M_TERRAIN,
    M_VEG,
    M_WINDOW,
    MATERIAL_SURFACE,
    NUM_MATERIALS,
    WEATHER_COLUMNS,
)
from simulation.procedural.layout import Objects, make_objects, make_street
from simulation.procedural.sprites import (
    GLASS,
    HEAD,
    LAMP,
    METAL,
    NUM_PARTS,
    SKIN,
    TAIL,
    TRUNK,
    TYRE,
    Sprites,
    part_colors,
    rasterize,
)
from simulation.procedural.styles import Style
from simulation.randomization import SceneParams
from simulation.sensor import apply_sensor_effects

REQUIRED_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "fence",
    "pole",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "vehicle",
)


@lru_cache(maxsize=3)
def _rain_streaks(slant: int, height: int = 256, width: int = 512) -> torch.Tensor:
    """``(height, width)`` rain-streak intensity in [0, 1]; ``slant`` 0..2 tilts them."""
    gen = torch.Generator().manual_seed(0x4A1 + slant)
    drops = (torch.rand(height, width, generator=gen) > 0.985).float()
    length, dx = 9, [0, 1, 2][slant]
    streak = torch.zeros(height, width)
    for i in range(length):
        streak += torch.roll(drops, shifts=(i, (i * dx) // 3), dims=(0, 1)) * (1 - i / length)
    return streak.clamp_(0, 1)


def _column(values: Sequence[float]) -> torch.Tensor:
    """Per-frame scalars as an ``(N, 1, 1)`` float32 tensor (broadcasts over pixels)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).view(-1, 1, 1)


class ProceduralRenderer:
    """Renders batches of :class:`SceneParams` in one style.

    Args:
        height, width: image size in pixels.
        style: appearance (:mod:`.styles`).
        class_index: ``{class name: taxonomy index}`` for the classes this renderer draws.
        compile: run the tensor kernels through ``torch.compile`` (faster for long runs,
            costs a one-off compilation of tens of seconds).
        passes: ``"fused"`` runs the per-pixel passes as compiled C loops
            (:mod:`.fused`), ``"torch"`` as the tensor kernels of :mod:`.kernels`
            (``"auto"``: :func:`.fused.resolve_kernels`).
    """

    def __init__(
        self,
        height: int,
        width: int,
        style: Style,
        class_index: dict[str, int],
        compile: bool = False,
        passes: str = "torch",
    ):
        self.passes = fused.resolve_kernels(passes, compile)
        missing = [c for c in REQUIRED_CLASSES if c not in class_index]
        if missing:
            raise ValueError(f"taxonomy: the procedural backend needs classes {missing}")
        self.height, self.width, self.style = height, width, style
        self.labels = dict(class_index)
        s = style
        self._parts = part_colors(
            {
                GLASS: s.glass,
                TYRE: s.tyre,
                TAIL: (0.8, 0.05, 0.05),
                HEAD: (0.95, 0.95, 0.85),
                SKIN: s.skin,
                METAL: s.pole,
                TRUNK: (0.30, 0.22, 0.15),
                LAMP: (0.9, 0.9, 0.8),
            }
        )
        assert self._parts.shape == (NUM_PARTS, 3)
        pal = np.zeros((NUM_MATERIALS, 3), np.float32)
        pal[M_ROAD], pal[M_MARK], pal[M_SIDEWALK] = s.road, s.marking, s.sidewalk
        pal[M_TERRAIN], pal[M_FENCE], pal[M_WINDOW] = s.terrain, s.fence, s.window
        pal[M_BUILDING : M_BUILDING + 6] = s.buildings
        pal[M_VEG : M_VEG + 3] = s.vegetation
        self._palette = torch.from_numpy(pal)
        self._classes = tuple(
            class_index[c]
            for c in ("road", "sidewalk", "terrain", "building", "vegetation", "fence", "sky")
        )
        self._kernels = {
            "background": kernels.background,
            "albedo": kernels.albedo,
            "shade": kernels.shade,
        }
        if compile:
            # inductor fuses the kernels' element-wise chains; shapes are static per batch size
            self._kernels = {
                name: torch.compile(fn, dynamic=False) for name, fn in self._kernels.items()
            }
        self._sign_colors = np.asarray(s.sign, np.float32)
        self._veg_colors = np.asarray(s.vegetation, np.float32)

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def render(
        self,
        params: Sequence[SceneParams],
        keys: Sequence[tuple[int, int]],
        threads: int | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Render frames.

        Args:
            params: ``N`` scenes (already adjusted by the style).
            keys: ``N`` ``(seed, index)`` pairs fixing each frame's layout and noise.
            threads: OpenMP threads of the fused passes (default: torch's thread count).

        Returns:
            ``(images (N, H, W, 3) uint8 RGB, masks (N, H, W) uint8)``: the image
            clamped to [0, 1] and stored as ``round(255 v)``.
        """
        h, w = self.height, self.width
        rngs = [np.random.default_rng([int(sd), int(i), 0x1A70]) for sd, i in keys]
        # parked cars, street trees and distractors draw from their own stream
        extra = [np.random.default_rng([int(sd), int(i), 0x57C7]) for sd, i in keys]
        streets = [make_street(p, r) for p, r in zip(params, rngs, strict=True)]
        objects = [
            make_objects(p, st, r, self.labels, self._sign_colors, self._veg_colors, x)
            for p, st, r, x in zip(params, streets, rngs, extra, strict=True)
        ]
        tex_off = torch.from_numpy(np.array([r.uniform(0, 256, size=2) for r in rngs], np.float32))
        g = _Geometry(params, h, w)
        noise = kernels.value_noise()
        surfaces = self._surfaces_fused if self.passes == "fused" else self._surfaces_torch
        depth, label, surface, height_m, emissive, albedo, puddle = surfaces(
            params, streets, tex_off, g, keys, noise, threads
        )
        # upright objects, z-tested against the background (numpy views share memory)
        depth_np, label_np = depth.numpy(), label.numpy()
        albedo_np, emissive_np = albedo.numpy(), emissive.numpy()
        sprites = self._project(objects, g)
        tile = None
        if sprites.texture is not None and (sprites.texture > 0).any():
            tile = textures.tiles()[textures.FAMILY_ID["foliage"], 0].numpy()
        draw = fused.sprites if self.passes == "fused" else rasterize
        buffers = (depth_np, label_np, albedo_np, emissive_np, self._parts)
        decal = sprites.decal
        if decal.any():
            draw(_select(sprites, decal), *buffers, True)
            sprites = _select(sprites, ~decal)
        # the upright objects' pixels are marked where they move the depth
        draw(sprites, *buffers, tile=tile, upright=(surface.numpy(), height_m.numpy()))
        wx = torch.tensor(
            [[getattr(p.weather, c) for c in WEATHER_COLUMNS] for p in params], dtype=torch.float32
        )
        light_k = torch.tensor(
            [[p.appearance.sun_intensity, p.appearance.ambient_intensity] for p in params],
            dtype=torch.float32,
        )
        streaks = self._streak_offsets(params, keys)
        if self.passes == "fused":
            table = torch.tensor([s or (-1, 0, 0) for s in streaks], dtype=torch.int32)
            buffers = {"albedo": albedo, "surface": surface, "emissive": emissive}
            buffers.update(depth=depth, height=height_m, puddle=puddle)
            image = fused.shade(
                g.dx.reshape(len(params), w),
                g.yw.reshape(len(params), h),
                g.zw.reshape(len(params), h),
                wx,
                light_k,
                noise,
                buffers,
                torch.stack([_rain_streaks(slant) for slant in range(3)]),
                table.view(len(params), 3),
                threads,
            )
        else:
            image = self._kernels["shade"](
                albedo,
                surface,
                emissive,
                depth,
                height_m,
                puddle,
                g.dx,
                g.yw,
                g.zw,
                wx,
                self._streaks(streaks),
                noise,
                light_k,
            )
            image = image.permute(0, 3, 1, 2).contiguous()
        if self.passes == "fused":
            image = fused.camera(image, self.style, keys, threads)
            image = fused.sensor(image.contiguous(), [p.sensor for p in params], keys, threads)
            image, label = fused.finish(image, label.contiguous(), g.roll.contiguous(), threads)
        else:
            image = camera_effects.apply(image, self.style, keys)
            image = apply_sensor_effects(image, [p.sensor for p in params], keys)
            image, label = self._roll(image, label, g.roll)
            image = (image.clamp_(0.0, 1.0).permute(0, 2, 3, 1) * 255.0 + 0.5).clamp_(0, 255)
            image = image.byte()
        return image.numpy(), label.numpy()

    @staticmethod
    def _streak_offsets(params: Sequence[SceneParams], keys) -> list[tuple[int, int, int] | None]:
        """Per frame, the rain-streak field (0..2, slanted by the wind) and its row and
        column offset; ``None`` without rain."""
        out = []
        for p, (seed, index) in zip(params, keys, strict=True):
            if p.weather.precipitation <= 0:
                out.append(None)
                continue
            slant = min(2, int(p.weather.wind_intensity // 34))
            fh, fw = _rain_streaks(slant).shape
            r = np.random.default_rng([int(seed), int(index), 0x4A1])
            out.append((slant, int(r.integers(0, fh)), int(r.integers(0, fw))))
        return out

    def _streaks(self, offsets: Sequence[tuple[int, int, int] | None]) -> torch.Tensor:
        """``(N, H, W)`` rain-streak intensity (zeros without rain) at ``offsets``."""
        h, w = self.height, self.width
        streak = torch.zeros(len(offsets), h, w)
        for i, entry in enumerate(offsets):
            if entry is None:
                continue
            slant, oy, ox = entry
            field = _rain_streaks(slant)
            # the crop of the field rolled by (oy, ox), tiled where the image is larger
            rows = (torch.arange(h) - oy) % field.shape[0]
            cols = (torch.arange(w) - ox) % field.shape[1]
            streak[i] = field[rows[:, None], cols[None, :]]
        return streak

    # --------------------------------------------------------------- surfaces
    def _surfaces_torch(self, params, streets, tex_off, g: _Geometry, keys, noise, threads):
        """The background, albedo and appearance passes as tensor kernels (:mod:`.kernels`).

        Returns ``depth, label, surface, height, emissive, albedo, puddle`` (see
        :func:`fused.surfaces` for their shapes)."""
        k = self._kernels
        depth, label, material, surface, height_m, tex_u, tex_v, emissive = k["background"](
            g.dx,
            g.yw,
            g.zw,
            g.cam_h,
            g.c0,
            g.ty,
            g.a,
            g.dash_phase,
            _column([s.left_edge for s in streets]),
            _column([s.right_edge for s in streets]),
            _column([p.road.sidewalk_width_m for p in params]),
            _column([p.road.lane_width_m for p in params]),
            _column([p.road.lanes for p in params]),
            torch.tensor(
                [[s.frontage_left, s.frontage_right] for s in streets], dtype=torch.float32
            ),
            _column([s.block_len for s in streets]),
            torch.from_numpy(np.stack([s.phase for s in streets]).astype(np.float32)),
            torch.from_numpy(np.stack([s.kind for s in streets])),
            torch.from_numpy(np.stack([s.top for s in streets]).astype(np.float32)),
            torch.from_numpy(np.stack([s.color for s in streets])),
            self._classes,
        )
        albedo, puddle = k["albedo"](
            self._palette,
            material,
            tex_u,
            tex_v,
            tex_off,
            float(self.style.texture),
            _column([p.weather.wetness / 100.0 for p in params]),
            _column([p.weather.precipitation_deposits / 100.0 for p in params]),
            noise,
        )
        albedo = self._appearance(params, albedo, material, surface, depth, tex_u, tex_v, g, keys)
        return depth, label, surface, height_m, emissive, albedo, puddle

    def _surfaces_fused(self, params, streets, tex_off, g: _Geometry, keys, noise, threads):
        """:meth:`_surfaces_torch` as one compiled loop (:func:`fused.surfaces`)."""
        n, h, w = len(params), self.height, self.width
        strength = [p.appearance.texture_strength for p in params]
        tinted = [any(t != (1.0, 1.0, 1.0) for t in p.appearance.tints) for p in params]
        appearance = any(strength) or any(tinted)
        offsets = np.zeros((n, 2))
        if any(strength):
            for i, (seed, index) in enumerate(keys):
                r = np.random.default_rng([int(seed), int(index), 0x7E7])
                offsets[i] = r.uniform(0, textures.S, size=2)
        cols = {
            "cam_h": g.cam_h,
            "c0": g.c0,
            "ty": g.ty,
            "a": g.a,
            "dash_phase": g.dash_phase,
            "left_edge": [s.left_edge for s in streets],
            "right_edge": [s.right_edge for s in streets],
            "sidewalk_width": [p.road.sidewalk_width_m for p in params],
            "lane_width": [p.road.lane_width_m for p in params],
            "lanes": [p.road.lanes for p in params],
            "frontage_left": [s.frontage_left for s in streets],
            "frontage_right": [s.frontage_right for s in streets],
            "block_len": [s.block_len for s in streets],
            "phase_left": [s.phase[0] for s in streets],
            "phase_right": [s.phase[1] for s in streets],
            "tex_off_u": tex_off[:, 0],
            "tex_off_v": tex_off[:, 1],
            "wetness": [p.weather.wetness / 100.0 for p in params],
            "deposits": [p.weather.precipitation_deposits / 100.0 for p in params],
            "focal": g.f,
            "texture_strength": strength,
            "texture_scale": [p.appearance.texture_scale for p in params],
            "texture_off_a": offsets[:, 0],
            "texture_off_b": offsets[:, 1],
        }
        table = [np.asarray(cols[c], np.float32).reshape(n) for c in fused.FRAME_COLUMNS]
        frame = torch.from_numpy(np.ascontiguousarray(np.stack(table, 1)))
        blocks = {
            k: torch.from_numpy(np.ascontiguousarray(np.stack([getattr(s, k) for s in streets])))
            for k in ("kind", "top", "color")
        }
        surf = torch.tensor(MATERIAL_SURFACE)
        family = torch.zeros(n, NUM_MATERIALS, dtype=torch.int32)
        tints = torch.ones(n, NUM_MATERIALS, 3)
        if any(strength):
            fam = torch.tensor(
                [[textures.FAMILY_ID[f] for f in p.appearance.textures] for p in params]
            )
            family = torch.cat([fam, torch.zeros(n, 1, dtype=fam.dtype)], 1)[:, surf]
        if any(tinted):
            t = torch.tensor([p.appearance.tints for p in params], dtype=torch.float32)
            tints = torch.cat([t, torch.ones(n, 1, 3)], 1)[:, surf]
        out = fused.surfaces(
            g.dx.reshape(n, w).contiguous(),
            g.yw.reshape(n, h).contiguous(),
            g.zw.reshape(n, h).contiguous(),
            frame,
            blocks["kind"].to(torch.int32),
            blocks["top"].to(torch.float32),
            blocks["color"].to(torch.int32),
            torch.tensor(self._classes, dtype=torch.int32),
            self._palette,
            float(self.style.texture),
            noise,
            textures.tiles(),
            appearance,
            family.to(torch.int32).contiguous(),
            tints.contiguous(),
            threads,
        )
        keys_ = ("depth", "label", "surface", "height", "emissive", "albedo", "puddle")
        return tuple(out[k] for k in keys_)

    # ------------------------------------------------------------ appearance
    def _appearance(self, params, albedo, material, surface, depth, tex_u, tex_v, g, keys):
        """Surface textures and colour tints of :class:`~simulation.randomization.Appearance`
        on ``albedo (N, H, W, 3)``; frames without them are left exactly as they are."""
        strength = [p.appearance.texture_strength for p in params]
        tinted = [any(t != (1.0, 1.0, 1.0) for t in p.appearance.tints) for p in params]
        if not any(strength) and not any(tinted):
            return albedo
        n = len(params)
        surf = torch.tensor(MATERIAL_SURFACE)
        idx = material + (torch.arange(n) * len(MATERIAL_SURFACE)).view(n, 1, 1)
        factor = torch.ones(material.shape)
        if any(strength):
            fam = torch.tensor(
                [[textures.FAMILY_ID[f] for f in p.appearance.textures] for p in params]
            )  # (N, len(SURFACES))
            fam = torch.cat([fam, torch.zeros(n, 1, dtype=fam.dtype)], 1)  # -1 -> flat
            table = fam[:, surf].reshape(-1)  # (N * NUM_MATERIALS,), family per material
            footprint = depth / g.f
            ground = surface == kernels.S_GROUND
            footprint = torch.where(
                ground, footprint * (depth / (4.0 * g.cam_h)).clamp(1.0, 8.0), footprint
            )
            offsets = []
            for seed, index in keys:
                r = np.random.default_rng([int(seed), int(index), 0x7E7])
                offsets.append(r.uniform(0, textures.S, size=2))
            value = textures.texture_lookup(
                table[idx],
                tex_u,
                tex_v,
                footprint,
                _column([p.appearance.texture_scale for p in params]),
                torch.tensor(np.asarray(offsets), dtype=torch.float32),
            )
            factor = 1.0 + _column(strength) * (value - 0.5) * 1.6
        factor = factor.unsqueeze(-1)
        if any(tinted):
            tints = torch.tensor([p.appearance.tints for p in params], dtype=torch.float32)
            tints = torch.cat([tints, torch.ones(n, 1, 3)], 1)[:, surf].reshape(-1, 3)
            factor = factor * tints[idx]
        out = albedo * factor
        return out

    # --------------------------------------------------------------- sprites
    def _project(self, objects: Sequence[Objects], g: _Geometry) -> Sprites:
        counts = [len(o.e) for o in objects]
        frame = np.repeat(np.arange(len(objects)), counts)
        cat = {
            k: np.concatenate([getattr(o, k) for o in objects])
            for k in (
                "e",
                "z",
                "width",
                "height",
                "base",
                "template",
                "label",
                "color",
                "decal",
                "texture",
            )
        }
        cam = g.per_frame_np(frame)
        x = cam["c0"] + cam["ty"] * cat["z"] + cam["a"] * cat["z"] ** 2 + cat["e"]
        cp, sp = np.cos(cam["pitch"]), np.sin(cam["pitch"])

        def project(y_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            yc = y_world - cam["cam_h"]
            y_cam = yc * cp - cat["z"] * sp
            z_cam = yc * sp + cat["z"] * cp
            return self.height / 2 - cam["f"] * y_cam / z_cam, z_cam

        v_bot, z_bot = project(cat["base"])
        v_top, _ = project(cat["base"] + cat["height"])
        decal = cat["decal"]
        if decal.any():  # flat on the ground: from its near edge up to its far edge
            half = np.where(decal, cat["height"] / 2, 0.0)
            zc = cat["z"]
            cat["z"] = zc - half
            v_near, z_near = project(np.zeros_like(zc))
            cat["z"] = zc + half
            v_far, _ = project(np.zeros_like(zc))
            cat["z"] = zc
            v_bot, v_top = np.where(decal, v_near, v_bot), np.where(decal, v_far, v_top)
            z_bot = np.where(decal, z_near, z_bot)
        u_c = self.width / 2 + cam["f"] * x / z_bot
        w_px = cam["f"] * cat["width"] / z_bot
        visible = (z_bot > 0.5) & (v_bot > v_top)
        # a decal's depth is its near edge, so the ground under all of it passes the test
        z_ref = np.where(decal, cat["z"] - cat["height"] / 2 - 0.05, cat["z"])
        depth = np.where(visible, z_ref, -1.0).astype(np.float32)
        return Sprites(
            frame=frame,
            u0=(u_c - w_px / 2).astype(np.float64),
            v0=v_top.astype(np.float64),
            w=np.maximum(w_px, 1e-3).astype(np.float64),
            h=np.maximum(v_bot - v_top, 1e-3).astype(np.float64),
            depth=depth,
            template=cat["template"],
            label=cat["label"],
            color=cat["color"],
            texture=cat["texture"],
            decal=decal,
        )

    # ------------------------------------------------------------------ roll
    def _roll(self, image: torch.Tensor, label: torch.Tensor, roll: torch.Tensor):
        """Rotate frames by their roll angle; labels outside the original view become 255."""
        if not bool((roll != 0).any()):
            return image, label
        n, _, h, w = image.shape
        theta = kernels.roll_theta(roll, h, w)
        grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
        image = F.grid_sample(
            image, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        lab = F.grid_sample(
            label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )[:, 0]
        outside = (grid.abs() > 1.0).any(dim=-1)
        lab[outside] = 255.0
        return image, lab.to(torch.uint8)


class _Geometry:
    """Per-pixel rays and per-frame camera/road constants for a batch.

    Ray components (camera at the origin, y up, z along the road):
    ``dx (N, 1, W)``, ``yw (N, H, 1)``, ``zw (N, H, 1)``.
    """

    def __init__(self, params: Sequence[SceneParams], h: int, w: int):
        n = len(params)

        def col(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32).view(n, 1, 1)

        fov = col([math.radians(p.camera.fov_deg) for p in params])
        self.f = (w / 2) / torch.tan(fov / 2)  # focal length (px)
        self.pitch = col([math.radians(p.camera.pitch_deg) for p in params])
        self.cam_h = col([p.camera.height_m for p in params])
        self.roll = torch.tensor([math.radians(p.camera.roll_deg) for p in params])
        # road centre line relative to the camera: c(z) = c0 + ty z + a z^2
        self.c0 = col([-p.camera.lateral_m for p in params])
        self.ty = col([math.tan(math.radians(p.camera.yaw_deg)) for p in params])
        self.a = col([p.road.curvature / 2 for p in params])
        self.dash_phase = col([p.road.lane_width_m * 7.0 % 9.0 for p in params])
        u = (torch.arange(w, dtype=torch.float32) + 0.5 - w / 2).view(1, 1, w)
        v = (torch.arange(h, dtype=torch.float32) + 0.5 - h / 2).view(1, h, 1)
        self.dx = u / self.f
        up = -v / self.f
        cp, sp = torch.cos(self.pitch), torch.sin(self.pitch)
        self.yw = up * cp + sp
        self.zw = cp - up * sp

    def centre(self, z: torch.Tensor) -> torch.Tensor:
        return self.c0 + self.ty * z + self.a * z * z

    def per_frame_np(self, frame: np.ndarray) -> dict[str, np.ndarray]:
        """Per-frame constants gathered for each element of ``frame`` (numpy float64)."""
        return {
            k: getattr(self, k).view(-1).double().numpy()[frame]
            for k in ("f", "pitch", "cam_h", "c0", "ty", "a")
        }


def _select(sprites: Sprites, keep: np.ndarray) -> Sprites:
    """The sprites where ``keep`` is true."""
    return Sprites(
        **{f: (v[keep] if isinstance(v, np.ndarray) else v) for f, v in vars(sprites).items()}
    )
