"""Metrics: FVD (I3D), FID (Inception-v3), LPIPS, PSNR/SSIM, feature statistics and named protocols."""

from walt.metrics.assets import MissingAssetError, UnsafePickleError, load_numpy_pickle, resolve_asset
from walt.metrics.evaluate import (
    compute_clip_stats,
    compute_dataset_stats,
    compute_folder_stats,
    evaluate_folders,
    evaluate_main,
)
from walt.metrics.i3d import I3D
from walt.metrics.inception import InceptionV3
from walt.metrics.lpips import LPIPS
from walt.metrics.pixel import (
    chroma_error,
    grid_phase,
    grid_profile,
    grid_ratio,
    pooled_grid_ratio,
    profile_spread,
    psnr,
    seam_ratio,
    ssim,
)
from walt.metrics.protocols import PROTOCOLS, Protocol, get_protocol, real_stats_key, register_protocol
from walt.metrics.resize import resize_bilinear_legacy
from walt.metrics.stats import FeatureStats, frechet_distance, frechet_distance_from_moments

__all__ = [
    "I3D",
    "LPIPS",
    "PROTOCOLS",
    "FeatureStats",
    "InceptionV3",
    "MissingAssetError",
    "Protocol",
    "UnsafePickleError",
    "chroma_error",
    "compute_clip_stats",
    "compute_dataset_stats",
    "compute_folder_stats",
    "evaluate_folders",
    "evaluate_main",
    "frechet_distance",
    "frechet_distance_from_moments",
    "get_protocol",
    "grid_phase",
    "grid_profile",
    "grid_ratio",
    "load_numpy_pickle",
    "pooled_grid_ratio",
    "profile_spread",
    "psnr",
    "real_stats_key",
    "register_protocol",
    "resize_bilinear_legacy",
    "resolve_asset",
    "seam_ratio",
    "ssim",
]
