"""Signed distances and weights of one hip's structures (pelvis, femur, joint, lesion) for its layers."""

from __future__ import annotations

import numpy as np

from simulation.phantom.anatomy import SIDE_SIGN, Hip, Lesion, Patient, head_sdf, necrotic_sdf
from simulation.phantom.shapes import (
    box,
    capsule,
    dist,
    dot,
    ellipsoid,
    shell,
    sphere,
    spherical_shell,
)

MARROW_INSET_MM = 2.5  # femoral cortex thickness scale: the head's subchondral plate is half of it
PLATE_CLEARANCE_MM = 0.75  # at least half the coarsest CT pixel (1.25 mm): anti-aliasing stays clear


class HipShapes:
    """One hip's structures as methods on coordinate arrays ``(x, y, z)``; layers paint them.

    Also holds the bounding boxes of the pelvis, femur and head. The femur's four parts are
    computed once per coordinate block: its cortex, marrow and texture layers share a box, and
    ``TissueMap`` hands layers sharing a box the same arrays.
    """

    def __init__(self, patient: Patient, hip: Hip) -> None:
        c, r = hip.centre, hip.radius
        lateral = SIDE_SIGN[hip.side]
        self.patient, self.hip, self.c, self.r = patient, hip, c, r
        self.gap = hip.joint_gap_mm
        self.neck_end = c + hip.neck_direction * hip.neck_length_mm
        self.shaft_end = self.neck_end + np.array([0.0, 0.0, -120.0])
        self.trochanter = self.neck_end + np.array([lateral * 14.0, 4.0, 14.0])
        self.trochanter_semi = np.array([13.0, 16.0, 22.0])
        self.neck_radius = 0.62 * r
        self.shaft_radius = 16.0
        self.cup = hip.cup_direction
        self.block_centre = c + self.cup * (r + 10.0) + np.array([-lateral * 4.0, 0.0, 12.0])
        self.block_semi = np.array([15.0, 30.0, 42.0])  # ilium-like: thin medio-laterally, tall
        self.cup_outer = r + self.gap + 7.0
        self.femur_box = (
            np.minimum.reduce(
                [
                    c - r - 3,
                    self.neck_end - 30,
                    self.shaft_end - self.shaft_radius - 2,
                    self.trochanter - self.trochanter_semi - 2,
                ]
            ),
            np.maximum.reduce(
                [
                    c + r + 3,
                    self.neck_end + 30,
                    self.shaft_end + self.shaft_radius + 2,
                    self.trochanter + self.trochanter_semi + 2,
                ]
            ),
        )
        self.head_box = box(c, r + 3.0)
        self.pelvis_box = (
            np.minimum(self.block_centre - self.block_semi - 2, c - self.cup_outer - 2),
            np.maximum(self.block_centre + self.block_semi + 2, c + self.cup_outer + 2),
        )
        self._parts_key: np.ndarray | None = None
        self._parts: tuple[np.ndarray, ...] = ()

    @property
    def lesion(self) -> Lesion:
        assert self.hip.lesion is not None
        return self.hip.lesion

    # ---- pelvis and joint

    def cup_side(self, x, y, z):
        """Negative on the acetabular side of the head (covering a bit more than a hemisphere)."""
        return -(dot(x, y, z, self.c, self.cup) + 0.3 * dist(x, y, z, self.c))

    def pelvis(self, x, y, z):
        cup_shell = np.maximum(
            shell(dist(x, y, z, self.c), self.r + self.gap, self.cup_outer), self.cup_side(x, y, z)
        )
        return np.minimum(ellipsoid(x, y, z, self.block_centre, self.block_semi), cup_shell)

    def pelvis_marrow(self, x, y, z):
        return self.pelvis(x, y, z) + 2.0

    def acetabular_sclerosis(self, x, y, z):
        c = self.c
        outer = spherical_shell(x, y, z, c, self.r + self.gap - 0.5, self.r + self.gap + 3.5)
        cone = 0.55 * dist(x, y, z, c) - dot(x, y, z, c, self.lesion.direction)
        return np.maximum(outer, np.maximum(cone, self.cup_side(x, y, z)))

    def effusion(self, x, y, z):
        """Joint effusion distending the capsule around the head and neck."""
        hip = self.hip
        end = self.c + hip.neck_direction * 0.6 * hip.neck_length_mm
        distended = capsule(x, y, z, self.c, end, self.r + self.gap + hip.effusion_mm)
        return np.maximum(distended, -self.cup_side(x, y, z))

    def cartilage(self, x, y, z):
        return sphere(x, y, z, self.c, self.r + self.gap)

    def joint_film(self, x, y, z):
        middle = self.r + 0.5 * self.gap
        return spherical_shell(x, y, z, self.c, middle - 0.3, middle + 0.3)

    # ---- femur

    def _femur_parts(self, x, y, z) -> tuple[np.ndarray, ...]:
        if self._parts_key is not x:
            self._parts_key = x
            self._parts = (
                head_sdf(self.hip, x, y, z),
                capsule(x, y, z, self.c, self.neck_end, self.neck_radius),
                capsule(x, y, z, self.neck_end + np.array([0, 0, 10.0]), self.shaft_end, self.shaft_radius),
                ellipsoid(x, y, z, self.trochanter, self.trochanter_semi),
            )
        return self._parts

    def femur(self, x, y, z, inset=0.0):
        head, neck, shaft, troch = self._femur_parts(x, y, z)
        head = head + inset * 0.5  # thin subchondral plate
        neck = neck + inset
        shaft = shaft + inset * 1.5
        troch = troch + inset * 0.6
        sdf = np.minimum(np.minimum(head, neck), np.minimum(shaft, troch))
        if self.hip.osteophyte_mm > 0 and inset == 0.0:
            ring = spherical_shell(x, y, z, self.c, self.r - 2.0, self.r + self.hip.osteophyte_mm)
            band = np.abs(dot(x, y, z, self.c, self.hip.neck_direction) - 0.55 * self.r) - 3.0
            sdf = np.minimum(sdf, np.maximum(ring, band))
        return sdf

    def femur_marrow(self, x, y, z):
        return self.femur(x, y, z, inset=MARROW_INSET_MM)

    def lesion_marrow(self, x, y, z):
        """Marrow where lesion tissue (oedema) may lie: clear of the plate, see ``head_marrow``."""
        return self.femur(x, y, z, inset=MARROW_INSET_MM + 2.0 * PLATE_CLEARANCE_MM)

    def head_marrow(self, x, y, z):
        """Head marrow where lesion tissue may lie. It stops ``PLATE_CLEARANCE_MM`` beneath the
        subchondral plate, so a lesion's anti-aliased edge never thins the plate: on CT the plate
        stays intact until the fracture of stage III."""
        return head_sdf(self.hip, x, y, z) + 0.5 * MARROW_INSET_MM + PLATE_CLEARANCE_MM

    def red_share(self, x, y, z):
        """Smooth marrow texture; more red marrow towards the shaft."""
        texture = 0.0
        for k, p in zip(self.patient.texture_waves, self.patient.texture_phase, strict=True):
            texture = texture + np.cos(dot(x, y, z, (0.0, 0.0, 0.0), k) + float(p))
        below = np.clip((float(self.c[2]) - z) * (1.0 / 60.0), 0.0, 1.0)
        return np.clip(self.patient.red_marrow * (1.0 + 0.35 * texture) + 0.35 * below, 0.0, 1.0)

    # ---- lesion

    def necrotic(self, x, y, z):
        return necrotic_sdf(self.lesion, self.c, self.r, x, y, z)

    def necrotic_in_head(self, x, y, z):
        return np.maximum(self.necrotic(x, y, z), self.head_marrow(x, y, z))

    def necrotic_shell_in_head(self, x, y, z, inner: float, outer: float):
        """The layer ``inner < necrotic < outer`` around the segment's boundary, within the marrow."""
        return np.maximum(shell(self.necrotic(x, y, z), inner, outer), self.head_marrow(x, y, z))

    def oedema_weight(self, x, y, z):
        outside = np.maximum(self.necrotic(x, y, z), 0.0)
        return self.lesion.oedema * np.exp(-outside / self.lesion.oedema_decay_mm)

    def fibrosis_weight(self, x, y, z):
        return np.full_like(x, self.lesion.fibrosis)

    def collapse_shell(self, x, y, z, depth_from: float, depth_to: float):
        """Depths ``depth_from``-``depth_to`` beneath the head surface, within the lesion's cap."""
        below_surface = shell(head_sdf(self.hip, x, y, z), -depth_to, -depth_from)
        return np.maximum(below_surface, self.necrotic(x, y, z) + 0.15 * self.lesion.extent_mm)
