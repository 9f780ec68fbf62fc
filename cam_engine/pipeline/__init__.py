"""The explain pipeline: image files in, heatmaps, pictures and tables out.

``cam-engine explain`` maps its options onto an :class:`ExplainConfig` and calls :func:`explain`
(this process) or :func:`cam_engine.distributed.explain_dataset` (a Ray cluster); both are made
of the pieces here, so both give the same outputs::

    from cam_engine.pipeline import ExplainConfig, explain

    summary = explain(ExplainConfig(["photos/"], "resnet50", out="out/", weights="DEFAULT"))

- :mod:`.config`: :class:`ExplainConfig`, every setting, checked when it is made;
- :mod:`.compute`: :func:`load` the model of a config, :func:`explain_images` of a decoded batch
  (image by image when the batch fails), maps at each image's original size;
- :mod:`.outputs`: each image's output name, CSV rows and pictures;
- :mod:`.folder`: the output folder: lock, settings, atomic files; :mod:`.parts`: the results
  of a run in this process, batch by batch, merged at its end;
- :mod:`.gallery`: ``index.html``, the pictures and the predictions table on one page;
- :mod:`.run`: :func:`run_job`, the frame of every run, and :func:`explain`.
"""

from .compute import Explained, check_model, explain_batch, explain_images, load, original_size_maps
from .config import SAVE_CHOICES, ExplainConfig, parse_targets, targets_text
from .folder import OutputFolder
from .outputs import PREDICTION_COLUMNS, output_name, pictures, prediction_rows, write_skipped
from .parts import Parts
from .run import Summary, explain, report, run_job

__all__ = [
    "PREDICTION_COLUMNS",
    "SAVE_CHOICES",
    "ExplainConfig",
    "Explained",
    "OutputFolder",
    "Parts",
    "Summary",
    "check_model",
    "explain",
    "explain_batch",
    "explain_images",
    "load",
    "original_size_maps",
    "output_name",
    "parse_targets",
    "pictures",
    "prediction_rows",
    "report",
    "run_job",
    "targets_text",
    "write_skipped",
]
