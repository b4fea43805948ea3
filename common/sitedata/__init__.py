"""A site's data: DICOM ingestion, hips, MR-CT pairs, labels, split, cache and the site check (no Flower)."""
