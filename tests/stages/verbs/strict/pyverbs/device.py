from pyverbs._strict import Context, Device, DeviceAttr, DeviceAttrEx, ODPCaps, get_device_list  # noqa: F401
