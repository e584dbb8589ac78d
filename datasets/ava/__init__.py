"""AVA v2.2 action detection: the official files' readers and writers, the frame-AP metric, a generated set."""

from .evaluate import FrameAP, average_precision, frame_ap, match_frame
from .files import (
    Annotation,
    Detection,
    LabelMap,
    PersonBox,
    Proposal,
    group_person_boxes,
    proposals_by_keyframe,
    read_annotations,
    read_detections,
    read_excluded,
    read_frame_list,
    read_label_map,
    read_proposals,
    write_detections,
)

__all__ = [
    "Annotation",
    "Detection",
    "FrameAP",
    "LabelMap",
    "PersonBox",
    "Proposal",
    "average_precision",
    "frame_ap",
    "group_person_boxes",
    "match_frame",
    "proposals_by_keyframe",
    "read_annotations",
    "read_detections",
    "read_excluded",
    "read_frame_list",
    "read_label_map",
    "read_proposals",
    "write_detections",
]
