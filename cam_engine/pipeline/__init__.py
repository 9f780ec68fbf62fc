"""The explain pipeline: image files in, heatmaps, pictures and tables out.

``cam-engine explain`` maps its options onto an :class:`ExplainConfig` and calls :func:`explain`
(this process) or :func:`cam_engine.distributed.explain_dataset` (a Ray cluster); both are made
of the pieces here, so both give the same outputs::

    from cam_engine.pipeline import ExplainConfig, explain

    summary = explain(ExplainConfig(["photos/"], "resnet50", out="out/", weights="DEFAULT"))

- :mod:`.config`: :class:`ExplainConfig`, every setting, checked when it is made;
- :mod:`.compute`: :func:`load` the model of a config, :func:`explain_images` of a decoded batch
  (image by image when the batch fails), maps at each image's original size;
- :mod:`.outputs`: CSV rows, pictures; :mod:`.folder`: the output folder (atomic writes,
  settings);
- :mod:`.run`: the single-process run.
"""

from .compute import Explained, check_model, explain_batch, explain_images, load, original_size_maps
from .config import SAVE_CHOICES, ExplainConfig, parse_targets, targets_text
from .folder import OutputFolder
from .outputs import PREDICTION_COLUMNS, pictures, prediction_rows, write_skipped
from .run import Summary, explain, report

__all__ = [
    "PREDICTION_COLUMNS",
    "SAVE_CHOICES",
    "ExplainConfig",
    "Explained",
    "OutputFolder",
    "Summary",
    "check_model",
    "explain",
    "explain_batch",
    "explain_images",
    "load",
    "original_size_maps",
    "parse_targets",
    "pictures",
    "prediction_rows",
    "report",
    "targets_text",
    "write_skipped",
]
