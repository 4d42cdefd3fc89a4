"""The admin site's name: fedmcp's operator console, not "Django administration"."""

from django.contrib import admin

admin.site.site_header = "fedmcp"
admin.site.site_title = "fedmcp admin"
admin.site.index_title = "Operator console"
