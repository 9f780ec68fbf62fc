"""Heatmaps for a whole data set on a Ray cluster (``pip install "cam-engine[ray]"``).

Ray Data takes the image paths, decodes them in tasks (:class:`cam_engine.io.ImageFolder`, as
``cam-engine explain``) and explains them in an actor pool: one model and
:class:`cam_engine.CAMEngine` per actor, loaded once, one GPU per actor when the cluster has
GPUs. Each actor writes its batches' results itself, one Parquet shard per batch, atomically, so
the driver never holds heatmaps; a rerun skips the images already done; a killed worker costs
its batch, which Ray retries; an unreadable image is recorded in ``skipped.csv``.

    from cam_engine.distributed import explain_dataset, read_heatmaps

    explain_dataset(["images/"], "out/", "resnet50", weights="DEFAULT", ray_address="auto")
    for key, maps in read_heatmaps("out/"):   # (K, H, W) float32 in [0, 1], original size
        ...

The output folder is described in :mod:`cam_engine.distributed.store`.
"""

try:
    import pyarrow  # noqa: F401
    import ray.data  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f'cam_engine.distributed needs Ray Data ({exc}): pip install "cam-engine[ray]"'
    ) from exc

from ..pipeline import Summary  # noqa: E402
from .driver import explain_dataset  # noqa: E402
from .store import read_heatmaps  # noqa: E402

__all__ = ["Summary", "explain_dataset", "read_heatmaps"]
