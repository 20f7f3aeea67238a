"""Tests of each pass in passes/, one file per pass (test_<pass file>.py), each running the pass on its own.

A package (unlike tests/native/) because test_schedule.py and test_fuse_native_bn.py share their names with
tests/test_schedule.py and tests/native/test_fuse_native_bn.py: under pytest's default import mode two test
modules without a package cannot share a basename in one run."""
