"""Video input pipeline: list-file datasets, PyAV decoding, clip transforms, samplers, demo data."""

from .decode import VideoInfo, clip_times, decode_frames, probe
from .mixup import VideoMixup
from .sampler import DistributedEvalSampler, ResumableDistributedSampler
from .synthetic import ensure_synthetic_dataset
from .transforms import normalize_clips
from .video_dataset import FailureTracker, VideoDataset, build_video_dataset, collate_clips, read_list_file

__all__ = [
    "DistributedEvalSampler",
    "FailureTracker",
    "ResumableDistributedSampler",
    "VideoDataset",
    "VideoInfo",
    "VideoMixup",
    "build_video_dataset",
    "clip_times",
    "collate_clips",
    "decode_frames",
    "ensure_synthetic_dataset",
    "normalize_clips",
    "probe",
    "read_list_file",
]
