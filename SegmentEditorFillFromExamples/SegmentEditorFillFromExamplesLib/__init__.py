from .SegmentEditorEffect import SegmentEditorEffect  # noqa: F401
