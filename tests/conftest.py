"""Session-wide test settings."""

# Under `--dist loadfile` (pyproject) each file is one unit of work, handed out in collection order:
# a long file handed out last leaves the other worker idle at the end. The longest ones go first.
LONGEST_FIRST = ("tests/train/test_sharding.py", "tests/nn/test_heterogeneous.py", "tests/train/test_trainer.py",
                 "tests/nn/test_model.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        return next((i for i, path in enumerate(LONGEST_FIRST) if item.nodeid.startswith(path)), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the order within a file and among the other files is kept
