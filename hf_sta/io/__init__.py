"""Everything that touches disk or the Hub; no math."""
