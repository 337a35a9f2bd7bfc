"""What the tests share: real peers, test data, environments, validators and result checks.

Test modules import from here and never from one another, so each test file can be read,
run and changed alone.
"""
