"""The review service: worklist, corrections, validation, auth, OHIF host, DICOMweb proxy."""
