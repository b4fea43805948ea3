"""Synthetic hospitals written as DICOM (docs/phantom.md); ``onfh synth`` is ``federation.main``.

Modules: ``plan`` (sizes, site profiles, patient plans), ``geometry`` (series geometries),
``dicom_writer`` (files, shared encoding), ``patient`` (one patient's studies), ``federation``
(all sites, labels, truth, manifest, the command).
"""
