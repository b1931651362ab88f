@echo off
rem InfiniteTalk web page launcher (Windows, double-click): the first run makes a virtual
rem environment and installs the package with its web page (torch with CUDA when an NVIDIA GPU is
rem there); every run starts the page and opens the browser. A second run installs nothing unless
rem pyproject.toml changed (the code itself is installed editable).
rem
rem Environment variables: INFINITETALK_VENV (default: .venv in the repository; one that already
rem has infinitetalk and gradio is used as it is), INFINITETALK_MODEL (e.g. tiny), INFINITETALK_PORT
rem (default 7860), INFINITETALK_NO_BROWSER=1, INFINITETALK_UI_ARGS (more `infinitetalk ui` options),
rem INFINITETALK_TORCH_INDEX (the torch wheel index, default the CUDA 12.4 one when a GPU is found).
setlocal EnableExtensions EnableDelayedExpansion
set "ROOT=%~dp0.."
for %%I in ("%ROOT%") do set "ROOT=%%~fI"
if defined INFINITETALK_VENV (set "VENV=%INFINITETALK_VENV%") else (set "VENV=%ROOT%\.venv")
set "PY=%VENV%\Scripts\python.exe"
set "STAMP=%VENV%\.infinitetalk-install"
if not defined INFINITETALK_PORT set "INFINITETALK_PORT=7860"

if defined INFINITETALK_VENV if not exist "%STAMP%" if exist "%PY%" (
    "%PY%" -c "import infinitetalk, gradio" >nul 2>&1 && (
        echo launch: using %VENV% as it is ^(infinitetalk and gradio are installed there^)
        goto start
    )
)
if not exist "%PY%" (
    where py >nul 2>&1 && (set "BASE=py -3") || (set "BASE=python")
    !BASE! -c "import sys; sys.exit(sys.version_info < (3, 10))" || (
        echo launch: Python 3.10 or newer is needed: install it from python.org ^(tick "Add to PATH"^)
        pause
        exit /b 2
    )
    echo launch: creating the environment %VENV%
    !BASE! -m venv "%VENV%" || (pause & exit /b 2)
)
for /f "tokens=* delims=" %%H in ('certutil -hashfile "%ROOT%\pyproject.toml" SHA256 ^| findstr /v ":"') do if not defined WANT set "WANT=%%H ui"
set "HAVE="
if exist "%STAMP%" set /p HAVE=<"%STAMP%"
if "!HAVE!"=="!WANT!" (
    echo launch: %VENV% is up to date
    goto start
)
echo launch: installing infinitetalk[ui] into %VENV% ^(the first time takes a few minutes^)
"%PY%" -m pip install -q --upgrade pip || (pause & exit /b 2)
if not defined INFINITETALK_TORCH_INDEX (
    where nvidia-smi >nul 2>&1 && set "INFINITETALK_TORCH_INDEX=https://download.pytorch.org/whl/cu124"
)
if defined INFINITETALK_TORCH_INDEX (
    "%PY%" -m pip install -q torch --index-url "%INFINITETALK_TORCH_INDEX%" || (pause & exit /b 2)
)
"%PY%" -m pip install -q -e "%ROOT%[ui]" || (pause & exit /b 2)
> "%STAMP%" echo !WANT!

:start
set "ARGS=ui --port %INFINITETALK_PORT%"
if defined INFINITETALK_MODEL set "ARGS=!ARGS! --model %INFINITETALK_MODEL%"
if "%INFINITETALK_NO_BROWSER%"=="1" set "ARGS=!ARGS! --no-browser"
if defined INFINITETALK_UI_ARGS set "ARGS=!ARGS! %INFINITETALK_UI_ARGS%"
echo launch: starting the page on http://127.0.0.1:%INFINITETALK_PORT% (close this window to stop it)
"%PY%" -m infinitetalk.cli !ARGS!
if errorlevel 1 pause
endlocal
