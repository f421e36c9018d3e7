"""ncd: unsupervised image classification and novel class discovery."""
