"""The TAP model: frozen backbone, named components, four-path routing, heads."""

from tap_core.model.backbone import Backbone, build_backbone
from tap_core.model.tap_model import Batch, ComponentValues, ModelPlan, TapModel

__all__ = ["Backbone", "Batch", "ComponentValues", "ModelPlan", "TapModel", "build_backbone"]
