"""Layers of the phantom: which tissue is painted where, in painting order (later over earlier)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from simulation.phantom.anatomy import Patient
from simulation.phantom.hip_shapes import HipShapes
from simulation.phantom.shapes import box, elliptic_cylinder, floats, sphere


@dataclass
class Layer:
    """One painted structure.

    Attributes:
        tissue: tissue name.
        sdf: signed distance (mm) on coordinate arrays; coverage is its anti-aliased inside.
        box: ``(lo, hi)`` LPS bounds outside which the layer is certainly empty; None = everywhere.
        weight: optional extra coverage factor in [0, 1] (mixtures such as oedema).
    """

    tissue: str
    sdf: Callable[..., np.ndarray]
    box: tuple[np.ndarray, np.ndarray] | None = None
    weight: Callable[..., np.ndarray] | None = None


def patient_layers(patient: Patient) -> list[Layer]:
    """All layers of a patient in painting order (later layers paint over earlier ones)."""
    body = partial(elliptic_cylinder, centre=floats(patient.body_centre), semi=floats(patient.body_semi_axes))
    layers = [
        Layer("subcutaneous_fat", body),
        Layer("muscle", partial(body, shrink=patient.fat_mm)),
    ]
    for side in ("R", "L"):
        layers += hip_layers(patient, side)
    return layers


def hip_layers(patient: Patient, side: str) -> list[Layer]:
    """The layers of one hip: pelvis, joint, femur, then the lesion's features."""
    shapes = HipShapes(patient, patient.hips[side])
    layers = _pelvis_layers(shapes) + _joint_layers(shapes) + _femur_layers(shapes)
    if shapes.hip.lesion is not None:
        layers += _lesion_layers(shapes)
    return layers


def _pelvis_layers(shapes: HipShapes) -> list[Layer]:
    """Acetabulum and ilium; at stage IV also acetabular sclerosis and cysts."""
    layers = [
        Layer("cortical_bone", shapes.pelvis, shapes.pelvis_box),
        Layer("red_marrow", shapes.pelvis_marrow, shapes.pelvis_box),
    ]
    if shapes.hip.acetabular_sclerosis:
        layers.append(
            Layer("acetabular_sclerosis", shapes.acetabular_sclerosis, box(shapes.c, shapes.cup_outer + 2))
        )
    for centre, radius in shapes.hip.acetabular_cysts:
        layers.append(Layer("cyst", partial(sphere, c=centre, r=radius), box(centre, radius + 2)))
    return layers


def _joint_layers(shapes: HipShapes) -> list[Layer]:
    """Effusion (if any), cartilage and the fluid film in its middle."""
    hip, c, r, gap = shapes.hip, shapes.c, shapes.r, shapes.gap
    layers = []
    if hip.effusion_mm > 0:
        layers.append(Layer("joint_fluid", shapes.effusion, box(c + hip.neck_direction * 15, r + gap + 20)))
    layers += [
        Layer("cartilage", shapes.cartilage, box(c, r + gap + 2)),
        Layer("joint_fluid", shapes.joint_film, box(c, r + gap + 2)),
    ]
    return layers


def _femur_layers(shapes: HipShapes) -> list[Layer]:
    """Cortex, fatty marrow, then red marrow weighted by the marrow texture."""
    return [
        Layer("cortical_bone", shapes.femur, shapes.femur_box),
        Layer("fatty_marrow", shapes.femur_marrow, shapes.femur_box),
        Layer("red_marrow", shapes.femur_marrow, shapes.femur_box, shapes.red_share),
    ]


def _lesion_layers(shapes: HipShapes) -> list[Layer]:
    """Oedema, the necrotic segment and its rim; the fracture cleft and compaction from stage III."""
    lesion, head_box = shapes.lesion, shapes.head_box
    layers = []
    if lesion.oedema > 0:
        oedema_box = box(shapes.c + shapes.hip.neck_direction * 12.0, shapes.r + 14.0)
        layers.append(Layer("marrow_oedema", shapes.lesion_marrow, oedema_box, shapes.oedema_weight))
    layers.append(Layer("necrotic_fat", shapes.necrotic_in_head, head_box))
    if lesion.fibrosis > 0:
        layers.append(Layer("necrotic_fibrosis", shapes.necrotic_in_head, head_box, shapes.fibrosis_weight))
    layers += _rim_layers(shapes)
    if shapes.hip.stage >= 3:
        compaction = 0.8 + 0.4 * lesion.depression_mm
        cleft_top = 1.2
        cleft_bottom = cleft_top + lesion.crescent_mm
        layers += [
            Layer(
                "compacted_bone",
                partial(shapes.collapse_shell, depth_from=cleft_bottom, depth_to=cleft_bottom + compaction),
                head_box,
            ),
            Layer(
                "fracture_cleft",
                partial(shapes.collapse_shell, depth_from=cleft_top, depth_to=cleft_bottom),
                head_box,
            ),
        ]
    return layers


def _rim_layers(shapes: HipShapes) -> list[Layer]:
    """The segment's boundary: reactive band at stage I, else double line, halo and cysts."""
    lesion, head_box = shapes.lesion, shapes.head_box
    rim = shapes.necrotic_shell_in_head
    if lesion.rim == "band":
        layers = [Layer("reactive_band", partial(rim, inner=0.0, outer=lesion.band_mm), head_box)]
    else:
        g, s, h = lesion.granulation_mm, lesion.sclerosis_mm, lesion.halo_mm
        layers = [
            Layer("sclerotic_halo", partial(rim, inner=s, outer=s + h), head_box),
            Layer("sclerosis", partial(rim, inner=0.0, outer=s), head_box),
            Layer("granulation", partial(rim, inner=-g, outer=0.0), head_box),
        ]
    for centre, radius in lesion.cysts:
        cyst_box = box(centre, radius + 3)
        layers.append(Layer("sclerosis", partial(sphere, c=centre, r=radius + 0.8), cyst_box))
        layers.append(Layer("cyst", partial(sphere, c=centre, r=radius), cyst_box))
    return layers
