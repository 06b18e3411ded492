"""Key capture: which keys real traffic meets, and how to rebuild their arguments."""
