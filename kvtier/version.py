"""The package version, in a module of its own so that modules inside kvtier can read it without importing the
package (whose __init__ reaches them back)."""
__version__ = "0.1.0"
