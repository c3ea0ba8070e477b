"""Readers for medical image formats: DICOM, NIfTI."""
