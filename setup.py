# What pyproject.toml cannot say: build the cffi extension (see build_native.py), and put the man
# pages into editable installs too.
from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel


class EditableWheelWithData(editable_wheel):
    """setuptools leaves data files out of editable wheels: it asks the distribution for
    `has_data`, which does not exist (the method is `has_data_files`). Install them as a normal
    wheel does, so `man bitnetd` works after `pip install -e .` as after `pip install .`."""

    def _run_install(self, category: str) -> None:
        if category == "data" and self.distribution.has_data_files():
            self.run_command("install_data")
        else:
            super()._run_install(category)


setup(cffi_modules=["build_native.py:ffibuilder"], cmdclass={"editable_wheel": EditableWheelWithData})
