"""Tier 2: the bucket layout (`layout`), what is on it (`tier2state`) and the S3 client (`s3`)."""
