"""Pose estimation: keypoints, top-down with a detector, DeepLabCut outputs."""
