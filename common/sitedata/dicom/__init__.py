"""DICOM ingestion: find series in a site folder (headers only), map them to protocols, load volumes."""

from common.sitedata.dicom.decode import decoder_hint, load_volume, supported_transfer_syntaxes
from common.sitedata.dicom.limits import DEFAULT_LIMITS, DicomLimits, LimitExceeded
from common.sitedata.dicom.model import FrameRef, PatientScan, SeriesInfo, SiteScan
from common.sitedata.dicom.scan import scan_site

__all__ = [
    "DEFAULT_LIMITS",
    "DicomLimits",
    "FrameRef",
    "LimitExceeded",
    "PatientScan",
    "SeriesInfo",
    "SiteScan",
    "decoder_hint",
    "load_volume",
    "scan_site",
    "supported_transfer_syntaxes",
]
