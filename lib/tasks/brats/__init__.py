"""BraTS 2021: task-1 NIfTI segmentation data and task-2 (RSNA-MICCAI radiogenomic) MR DICOM data."""
