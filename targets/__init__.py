"""Hardware profiles (data files beside this module) and the cost model that reads them."""
