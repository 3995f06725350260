"""`buildfleet rebuild`: many images at once (a base-image CVE, a nightly refresh)."""
