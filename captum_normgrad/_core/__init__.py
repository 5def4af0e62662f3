"""The one private tree every folder of the package may import (as Captum's ``_utils/``)."""
