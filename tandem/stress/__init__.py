"""Stress and fault tools that drive a running tandem server (`tandem stress`)."""
