"""`appliance demo`: the whole appliance plus a scripted player client, shown live."""
