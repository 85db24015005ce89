"""Core ML: conversion with precision islands, and reading a saved mlpackage back on any OS."""
