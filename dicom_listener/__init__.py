"""DICOM ingest: C-STORE SCP, Orthanc follower, watch folder, study assembly."""

from dicom_listener.assembly import StudyAssembler
from dicom_listener.ingest import Ingestor, IngestOutcome
from dicom_listener.instance import InstanceHeader, InvalidInstance
from dicom_listener.orthanc_follower import OrthancFollower
from dicom_listener.scp import build_server
from dicom_listener.upper_layer import StoreServer
from dicom_listener.watch import WatchFolder

__all__ = [
    "IngestOutcome",
    "Ingestor",
    "InstanceHeader",
    "InvalidInstance",
    "OrthancFollower",
    "StoreServer",
    "StudyAssembler",
    "WatchFolder",
    "build_server",
]
